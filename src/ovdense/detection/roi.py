"""What a two-stage detector's box head needs besides features: proposal sampling and box deltas (torchvision's
Matcher, BalancedPositiveNegativeSampler and BoxCoder, with detectron2's Fast R-CNN defaults)."""
from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # detectron2's ROI_BOX_HEAD.BBOX_REG_WEIGHTS
BOX_CLAMP = math.log(1000.0 / 16)


class ProposalSampler:
    """Label and sample proposals for the box head (detectron2's `label_and_sample_proposals`).

    The ground-truth boxes join the proposals; each proposal takes the class of its best-overlapping ground truth
    when the IoU reaches `fg_iou` and is background (label = `background`) otherwise; `batch_size` proposals
    per image are sampled, at most `positive_fraction` of them foreground.
    """

    def __init__(self, batch_size: int = 512, positive_fraction: float = 0.25, fg_iou: float = 0.5):
        self.matcher = Matcher(fg_iou, fg_iou, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size, positive_fraction)

    @torch.no_grad()
    def __call__(self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], background: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """proposals [(P_i, 4)], targets [{'boxes': (G_i, 4), 'labels': (G_i,) in 0..K-1}] -> sampled boxes
        [(S_i, 4)], labels [(S_i,)] (background for negatives) and matched ground-truth boxes [(S_i, 4)]."""
        labels, matched_boxes, all_boxes = [], [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(boxes), target["labels"]
            boxes = torch.cat([boxes, gt_boxes])
            if len(gt_boxes):
                index = self.matcher(box_iou(gt_boxes, boxes))
                label = gt_labels[index.clamp(min=0)].clone()
                label[index < 0] = background
                matched = gt_boxes[index.clamp(min=0)]
            else:
                label = torch.full((len(boxes),), background, dtype=torch.long, device=boxes.device)
                matched = torch.zeros_like(boxes)
            labels.append(label)
            matched_boxes.append(matched)
            all_boxes.append(boxes)
        positive, negative = self.sampler([torch.where(label == background, 0, 1) for label in labels])
        out = []
        for boxes, label, matched, pos, neg in zip(all_boxes, labels, matched_boxes, positive, negative):
            keep = (pos | neg).nonzero(as_tuple=True)[0]
            out.append((boxes[keep], label[keep], matched[keep]))
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def box_coder() -> BoxCoder:
    return BoxCoder(BOX_WEIGHTS, bbox_xform_clip=BOX_CLAMP)
