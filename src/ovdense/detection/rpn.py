"""Class-agnostic region proposals: torchvision's RPN on one feature map, keeping the objectness scores."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's `RegionProposalNetwork` over a single (B, C, h, w) feature map.

    `propose` returns the objectness probabilities that torchvision's `forward` drops (RegionCLIP multiplies
    them into its class scores on LVIS). Sizes are anchor side lengths in input pixels; each of the
    len(sizes) x len(aspect_ratios) anchors sits at every feature location (detectron2's C4 RPN: sizes
    32..512, ratios 0.5/1/2, 15 anchors).
    """

    def __init__(self, in_channels: int, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 conv_depth: int = 1, pre_nms_top_n: tuple[int, int] = (12000, 6000),
                 post_nms_top_n: tuple[int, int] = (2000, 1000), nms_thresh: float = 0.7, min_size: float = 0.0,
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5):
        anchors = AnchorGenerator((tuple(sizes),), (tuple(aspect_ratios),))
        head = RPNHead(in_channels, anchors.num_anchors_per_location()[0], conv_depth=conv_depth)
        super().__init__(anchors, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction,
                         dict(training=pre_nms_top_n[0], testing=pre_nms_top_n[1]),
                         dict(training=post_nms_top_n[0], testing=post_nms_top_n[1]), nms_thresh)
        self.min_size = min_size

    def propose(self, features: torch.Tensor, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """features (B, C, h, w) of the padded images (B, 3, H, W) whose valid parts are `image_sizes` [(H_i, W_i)]
        -> proposals [(P_i, 4) xyxy], objectness probabilities [(P_i,)], and with `targets` ([{'boxes': (G_i, 4)}])
        the RPN losses {'loss_objectness', 'loss_rpn_box_reg'}."""
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        maps = list(OrderedDict(level=features).values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(image_list, maps)
        counts = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, image_list.image_sizes, counts)
        losses = {}
        if targets is not None:
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            regression = self.box_coder.encode(matched, anchors)
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses

