"""RegionCLIP (Zhong et al., CVPR 2022): region-text pretraining of CLIP's image encoder, and the open-vocabulary
Faster R-CNN it transfers to (microsoft/RegionCLIP: `PretrainFastRCNN`, `CLIPFastRCNN`, `CLIPRes5ROIHeads`).

Region embeddings (`RegionEncoder`):
  ResNet CLIP (the paper): res4 map (stride 16) -> RoIAlign 14x14 (aligned) -> res5 -> attention pool -> (R, D).
  ViT CLIP (an ovdense extension): RoIAlign on the dense joint-space map (`CLIPBackbone.dense_features`,
  MaskCLIP's value path by default), averaged over the RoI -> (R, D).
Classification is the cosine between a region embedding and the text embeddings of the class names, with a
background class whose embedding is the zero vector (its logit is always 0), divided by a temperature of 0.01.
"""
from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from ..backbones import CLIPBackbone, load_clip
from ..backbones.clip import convolution_layout
from ..detection.roi import ProposalSampler, box_coder
from ..detection.rpn import OfflineRPN, ProposalNetwork
from ..errors import CheckpointError, InputError, UsageError
from ..text import TextEmbeddingCache, resolve_templates
from .base import NO_CLIP, TrainedModel

TEMPERATURE = 0.01
ROI_CHUNK = 50  # regions through res5 at once (measured fastest on a 2-core CPU, channels-last)
RPN_SOURCES = ("clip", "offline")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a FrozenBatchNorm2d with its statistics; returns it."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen.to(child.weight.device))
        else:
            freeze_batchnorm(child)
    return module


def freeze_resnet_tower(visual: nn.Module) -> None:
    """detectron2's CLIP ResNet setting: FrozenBN everywhere, the stem and res2 (layer1) frozen (FREEZE_AT 2)."""
    freeze_batchnorm(visual)
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1"):
        getattr(visual, name).requires_grad_(False)


def image_tower(clip: CLIPBackbone) -> CLIPBackbone:
    """A CLIPBackbone holding its own copy of `clip`'s image tower and no text tower (for training it)."""
    holder = nn.Module()
    holder.visual = copy.deepcopy(clip.visual)
    return CLIPBackbone(holder, None, clip.name, clip.weights)


def trunk_map(clip: CLIPBackbone, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The map a C4 detector works on, and its stride: ResNet res4 (B, 1024*w/64, H/16, W/16); ViT the tokens
    before the last block (B, width, H/p, W/p)."""
    images = images.to(clip.dtype)
    if clip.arch == "resnet":
        return clip._resnet_trunk(images, stages=3)[-1], 16
    tokens, grid = clip.vit_tokens(images, depth=-1)
    return tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, *grid), clip.stride


class RegionEncoder(nn.Module):
    """Region embeddings from a CLIP image tower (see the module docstring).

    resolution: RoIAlign output side (default 14 for ResNet, as RegionCLIP; 7 for ViT). mode: the ViT dense mode.
    """

    def __init__(self, clip: CLIPBackbone, resolution: int | None = None, mode: str = "maskclip"):
        super().__init__()
        self.clip = clip
        self.resolution = resolution or (14 if clip.arch == "resnet" else 7)
        self.mode = mode

    def feature_map(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, 3, H, W) normalised images -> the map regions are pooled from, and its stride."""
        if self.clip.arch == "resnet":
            return trunk_map(self.clip, images)
        return self.clip.dense_features(images, self.mode).features, self.clip.stride

    def pool(self, features: torch.Tensor, stride: int, boxes: list[torch.Tensor]) -> torch.Tensor:
        """features (B, C, h, w), boxes [(R_i, 4) xyxy in input pixels] -> (sum R_i, D) region embeddings.

        ResNet regions go through res5 and the attention pool ROI_CHUNK at a time (1000 RoIs of 14x14x1024 would be
        0.8 GB at once), in the trunk's `convolution_layout`."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        rois = rois.to(features.dtype)  # (sum R_i, 5): image index, x1, y1, x2, y2
        align = lambda r: roi_align(features, r, self.resolution, 1.0 / stride, sampling_ratio=0,  # noqa: E731
                                    aligned=True)
        if self.clip.arch != "resnet":
            return align(rois).mean(dim=(2, 3))
        return torch.cat([self.clip.global_attention_pool(self.clip.visual.layer4(convolution_layout(align(chunk))))
                          for chunk in rois.split(ROI_CHUNK)])

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        features, stride = self.feature_map(images)
        return self.pool(features, stride, boxes)


def region_logits(regions: torch.Tensor, text: torch.Tensor, background: bool = True,
                  temperature: float = TEMPERATURE) -> torch.Tensor:
    """(R, D) region embeddings, (K, D) text embeddings -> (R, K [+ 1]) cosine / temperature; with `background`
    a last column for the zero background embedding (cosine 0, so logit 0)."""
    logits = F.normalize(regions.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    return torch.cat([logits, logits.new_zeros(len(logits), 1)], dim=1) if background else logits


def box_classification_loss(logits: torch.Tensor, labels: torch.Tensor, focal_gamma: float | None = 0.5,
                            background_weight: float = 0.2) -> torch.Tensor:
    """RegionCLIP's box-classification loss: (R, K + 1) logits (background last), (R,) labels -> scalar.

    focal_gamma given (COCO, 0.5): mean over the R regions of CE x (1 - p_t)^gamma x w, where w is
    `background_weight` for background regions and 1 otherwise. None (LVIS): cross-entropy with class weights
    (1, ..., 1, background_weight), normalised by the summed weights (PyTorch's weighted mean).
    """
    if not len(labels):
        return logits.sum() * 0
    weight = logits.new_ones(logits.shape[1])
    weight[-1] = background_weight
    if focal_gamma is None:
        return F.cross_entropy(logits, labels, weight=weight)
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = logits.softmax(dim=-1).gather(1, labels[:, None])[:, 0]
    # (1 - p_t)^gamma has an infinite gradient at p_t = 1, which logits / 0.01 reach in float32: kept off 0
    return (ce * (1 - p_t).clamp(min=torch.finfo(p_t.dtype).eps) ** focal_gamma * weight[labels]).mean()


class _NoCLIP:
    """What a converted release records as its CLIP: none (its file holds the image tower and class embeddings)."""

    name = weights = NO_CLIP


_NO_CLIP = _NoCLIP()


def blank_image_tower(arch: str) -> CLIPBackbone:
    """A CLIPBackbone holding only the image tower of open_clip's `arch`, randomly initialised (a file fills it)."""
    with torch.random.fork_rng():
        model = open_clip.create_model(arch, pretrained=None)
    holder = nn.Module()
    holder.visual = model.visual
    return CLIPBackbone(holder, None, arch, NO_CLIP)


class RegionCLIPDetector(TrainedModel, nn.Module):
    """The open-vocabulary Faster R-CNN (C4) of RegionCLIP.

    clip: the CLIP whose text tower embeds class names and whose frozen trunk feeds the proposal network.
    encoder: the region encoder (its own, trainable image tower: CLIP's or a RegionCLIP-pretrained one).
    class_names: the training classes (their text embeddings are the classifier; frozen).
    rpn_source: where proposals come from, frozen in both cases:
        'clip': `proposals`, a class-agnostic ProposalNetwork (arguments `rpn`) on the CLIP's frozen res4, trained
            beforehand on base boxes (`ovdense train rpn`);
        'offline': `offline_rpn`, detectron2's ImageNet R-50 RPN the released detectors use (OfflineRPN arguments
            `offline_rpn`), on its own input (BGR 0-255 minus its pixel mean).
    stored_text: the class embeddings are weights of the file (`class_embeddings` (K, D), e.g. RegionCLIP's
        concept-embedding files or a detector's test classifier) instead of being computed from `class_names`.
    clip None: a converted release, whose file holds the whole image tower: `arch` is the open_clip architecture it
        is built as, `text_weights` the CLIP weights (tag or file) whose text tower embeds names other than the stored
        ones, loaded the first time one is asked (never when only stored names are). Needs rpn_source 'offline' and
        stored_text.
    Box regression is class-agnostic: (R, D) -> (R, 4) deltas with detectron2's weights (10, 10, 5, 5).
    """

    name = "regionclip"

    def __init__(self, clip: CLIPBackbone | None, class_names: list[str], rpn: dict | None = None,
                 resolution: int | None = None, mode: str = "maskclip", focal_gamma: float | None = 0.5,
                 background_weight: float = 0.2, templates: str = "imagenet80", roi_batch: int = 512,
                 positive_fraction: float = 0.25, fg_iou: float = 0.5, init: CLIPBackbone | None = None,
                 rpn_source: str = "clip", offline_rpn: dict | None = None, stored_text: bool = False,
                 arch: str | None = None, text_weights: str | None = None):
        super().__init__()
        if rpn_source not in RPN_SOURCES:
            raise UsageError(f"rpn_source must be one of {', '.join(RPN_SOURCES)}, got {rpn_source!r}")
        if clip is None and not (rpn_source == "offline" and stored_text and arch):
            raise UsageError("a RegionCLIP detector without a CLIP needs rpn_source='offline', stored_text=True and "
                             "the open_clip arch of its image tower")
        self.config = {"class_names": list(class_names), "rpn": dict(rpn or {}), "resolution": resolution,
                       "mode": mode, "focal_gamma": focal_gamma, "background_weight": background_weight,
                       "templates": templates, "roi_batch": roi_batch, "positive_fraction": positive_fraction,
                       "fg_iou": fg_iou, "rpn_source": rpn_source, "offline_rpn": dict(offline_rpn or {}),
                       "stored_text": stored_text, "arch": arch, "text_weights": text_weights}
        if clip is not None:
            self.clip = clip.requires_grad_(False)
            tower = image_tower(init or clip).requires_grad_(True)
        else:
            tower = blank_image_tower(arch)
            # the predictor reads the image normalisation and device from `clip`: the tower itself, not registered
            # a second time (the state dict keeps one copy)
            object.__setattr__(self, "clip", tower)
        if tower.arch == "resnet":
            freeze_resnet_tower(tower.visual)
        self.encoder = RegionEncoder(tower, resolution, mode)
        if rpn_source == "offline":
            self.offline_rpn = OfflineRPN(**self.config["offline_rpn"]).requires_grad_(False)
        else:
            channels = trunk_map(clip, torch.zeros(1, 3, 64, 64, device=clip.device))[0].shape[1]
            self.proposals = ProposalNetwork(channels, **self.config["rpn"]).requires_grad_(False)
        self.box_head = nn.Linear(tower.embed_dim, 4)
        nn.init.normal_(self.box_head.weight, std=0.001)
        nn.init.zeros_(self.box_head.bias)
        self.box_coder = box_coder()
        self.sampler = ProposalSampler(roi_batch, positive_fraction, fg_iou)
        self.focal_gamma, self.background_weight = focal_gamma, background_weight
        self.templates = resolve_templates(templates)
        if stored_text:  # filled from the file
            self.register_buffer("class_embeddings", torch.zeros(len(class_names), tower.embed_dim))
        else:
            self.register_buffer("class_embeddings", self.embed_text(class_names), persistent=False)

    @property
    def saved_prefixes(self) -> tuple[str, ...]:
        """Saved whole, frozen or not: the image tower (maybe RegionCLIP-pretrained) and the RPN."""
        return ("encoder.", "offline_rpn." if self.config["rpn_source"] == "offline" else "proposals.")

    def train(self, mode: bool = True) -> "RegionCLIPDetector":
        super().train(mode)
        if "clip" in self._modules:
            self.clip.eval()
        (self.offline_rpn if self.config["rpn_source"] == "offline" else self.proposals).eval()  # frozen, test top-n
        return self

    def text_clip(self) -> CLIPBackbone:
        """The CLIP that embeds class names: the detector's own, or for a converted release the `text_weights` of its
        `arch`, loaded once when first needed."""
        if "clip" in self._modules:
            return self.clip
        if self.__dict__.get("_text_clip") is None:
            stored = len(self.config["class_names"])
            if not self.config["text_weights"]:
                raise InputError(f"this RegionCLIP detector knows the text embeddings of its {stored} classes only "
                                 "and records no CLIP text tower for other names; ask for those classes")
            try:
                clip = load_clip(self.config["arch"], self.config["text_weights"], device=str(self.clip.device))
            except CheckpointError as error:
                raise CheckpointError(f"names outside this detector's {stored} stored class embeddings need the "
                                      f"{self.config['arch']} text tower ({self.config['text_weights']}): {error}"
                                      ) from error
            object.__setattr__(self, "_text_clip", clip.requires_grad_(False))
        return self._text_clip

    def embed_text(self, names: list[str], cache: TextEmbeddingCache | None = None) -> torch.Tensor:
        """(K,) class names -> (K, D) text embeddings: the mean over the detector's templates of the raw prompt
        embeddings, normalised (RegionCLIP's class-embedding files); with `stored_text` the stored rows of the names
        among `class_names`, the others computed."""
        cache = cache if cache is not None else TextEmbeddingCache()  # an empty cache is falsy
        names = list(names)
        row = {name: i for i, name in enumerate(self.config["class_names"])} if self.config["stored_text"] else {}
        others = [name for name in dict.fromkeys(names) if name not in row]
        computed = dict(zip(others, cache.embed(self.text_clip(), others, self.templates, raw_mean=True))) \
            if others else {}
        device = self.class_embeddings.device if self.config["stored_text"] else self.clip.device
        return torch.stack([self.class_embeddings[row[n]] if n in row else computed[n].to(device) for n in names])

    @torch.no_grad()
    def propose(self, images: torch.Tensor, image_sizes: list[tuple[int, int]]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class-agnostic proposals [(P_i, 4)] of the frozen RPN and their objectness [(P_i,)] as it hands it over:
        the offline RPN's logits (what RegionCLIP's code multiplies in), a ProposalNetwork's probabilities.

        images: (B, 3, H, W) normalised with the CLIP's mean and std; the offline RPN gets them back in 0-255 units.
        """
        if self.config["rpn_source"] == "offline":
            mean = images.new_tensor(self.clip.image_mean).view(-1, 1, 1)
            std = images.new_tensor(self.clip.image_std).view(-1, 1, 1)
            return self.offline_rpn((images.float() * std + mean) * 255, image_sizes)
        features, _ = trunk_map(self.clip, images)
        boxes, scores, _ = self.proposals.propose(features.float(), images, image_sizes)
        return boxes, scores

    def regions(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region embeddings (R, D) and class-agnostic box deltas (R, 4) of `boxes` [(R_i, 4)]."""
        embeddings = self.encoder(images, boxes).float()
        return embeddings, self.box_head(embeddings)

    def losses(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) normalised and padded; targets [{'boxes': (G_i, 4), 'labels': (G_i,), 'size': (H_i,
        W_i)}] with labels indexing the training classes -> {'loss', 'loss_cls', 'loss_box_reg'}."""
        sizes = [tuple(int(s) for s in t["size"]) for t in targets]
        proposals, _ = self.propose(images, sizes)
        background = len(self.class_embeddings)
        boxes, labels, matched = self.sampler(proposals, targets, background)
        embeddings, deltas = self.regions(images, boxes)
        labels, boxes, matched = torch.cat(labels), torch.cat(boxes), torch.cat(matched)
        logits = region_logits(embeddings, self.class_embeddings)
        loss_cls = box_classification_loss(logits, labels, self.focal_gamma, self.background_weight)
        foreground = labels != background
        targets_deltas = self.box_coder.encode_single(matched[foreground], boxes[foreground])
        loss_box = F.smooth_l1_loss(deltas[foreground], targets_deltas, beta=0.0, reduction="sum") / max(1, len(labels))
        return {"loss": loss_cls + loss_box, "loss_cls": loss_cls, "loss_box_reg": loss_box}

    @torch.no_grad()
    def embed_image(self, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                    boxes: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Everything about an image that does not depend on the vocabulary, per image: 'boxes' (R, 4) refined by
        the box head and clipped, 'embeddings' (R, D), 'objectness' (R,) as `propose` gives it (1 for given boxes).

        boxes: given regions (e.g. ground truth) instead of the RPN's; they are not refined.
        """
        if boxes is None:
            proposals, objectness = self.propose(images, image_sizes)
        else:
            proposals = [b.to(images.device, torch.float32) for b in boxes]
            objectness = [torch.ones(len(b), device=images.device) for b in proposals]
        embeddings, deltas = self.regions(images, proposals)
        out = []
        for props, scores, emb, delta, (height, width) in zip(
                proposals, objectness, embeddings.split([len(p) for p in proposals]),
                deltas.split([len(p) for p in proposals]), image_sizes):
            refined = props if boxes is not None else self.box_coder.decode_single(delta, props)
            refined = torch.stack([refined[:, 0].clamp(0, width), refined[:, 1].clamp(0, height),
                                   refined[:, 2].clamp(0, width), refined[:, 3].clamp(0, height)], dim=1)
            out.append({"boxes": refined, "embeddings": emb, "objectness": scores})
        return out

    @staticmethod
    def class_scores(embedded: dict[str, torch.Tensor], text: torch.Tensor, multiply_objectness: bool = False
                     ) -> torch.Tensor:
        """(R, K) class probabilities of an image's regions for (K, D) text embeddings: softmax over the K classes
        and background, background dropped.

        multiply_objectness: RegionCLIP's MULTIPLY_RPN_SCORE (LVIS): sqrt(p x objectness) with the objectness the
        RPN handed over. RegionCLIP's code multiplies the offline RPN's raw logits, not their sigmoid, so scores
        can pass 1 and a region with a negative logit scores NaN there, which its post-processing drops; here it
        scores 0, which no score threshold (>= 0) lets through either.
        """
        probs = region_logits(embedded["embeddings"], text).softmax(dim=-1)[:, :-1]
        if multiply_objectness:
            probs = torch.sqrt((probs * embedded["objectness"][:, None]).clamp(min=0))
        return probs

    @property
    def backbone(self):
        """The CLIP the detector was built on (recorded in saved files), or a stand-in named 'none' for a converted
        release."""
        return self._modules["clip"] if "clip" in self._modules else _NO_CLIP


class RegionProposer(TrainedModel, nn.Module):
    """A class-agnostic RPN on a frozen CLIP trunk (`trunk_map`), trained on base-class boxes; RegionCLIP's
    offline RPN (the official one is a separate ImageNet R50; here the CLIP's own frozen trunk feeds it)."""

    name = "rpn"

    def __init__(self, clip: CLIPBackbone, **rpn):
        super().__init__()
        self.config = dict(rpn)
        self.clip = clip.requires_grad_(False)
        channels = trunk_map(clip, torch.zeros(1, 3, 64, 64, device=clip.device))[0].shape[1]
        self.network = ProposalNetwork(channels, **rpn)

    @property
    def backbone(self) -> CLIPBackbone:
        return self.clip

    def train(self, mode: bool = True) -> "RegionProposer":
        super().train(mode)
        self.clip.eval()
        return self

    def losses(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """RPN losses on padded images (B, 3, H, W) with targets [{'boxes', 'size'}]."""
        with torch.no_grad():
            features, _ = trunk_map(self.clip, images)
        sizes = [tuple(int(s) for s in t["size"]) for t in targets]
        _, _, losses = self.network.propose(features.float(), images, sizes, targets)
        return {"loss": losses["loss_objectness"] + losses["loss_rpn_box_reg"], **losses}



# ----------------------------------------------------------------------------------------- pretraining
def pseudo_concepts(teacher_regions: torch.Tensor, concepts: torch.Tensor, threshold: float = 0.1,
                    temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RegionCLIP's pseudo region-text pairs: (R, D) teacher region embeddings, (C, D) concept embeddings ->
    teacher probabilities softmax(cos / temperature) (R, C), the regions kept (R,) bool (top-1 probability above
    `threshold`; all of them when none is) and each region's top-1 concept (R,)."""
    probs = region_logits(teacher_regions, concepts, background=False, temperature=temperature).softmax(dim=-1)
    best, labels = probs.max(dim=-1)
    keep = best > threshold
    if not keep.any():
        keep = best > 0
    return probs, keep, labels


def mil_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(N, M) logits, (N, M) 0/1 positives -> mean over rows of -log(sum of the softmax over the positives)."""
    return -torch.log((logits.softmax(dim=-1) * positives).sum(dim=-1)).mean()


def region_concept_losses(student_regions: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor,
                          concepts: torch.Tensor, temperature: float = TEMPERATURE
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two region-level losses on the kept regions: (N, D) student embeddings, (N, C) teacher probabilities,
    (N,) pseudo labels, (C, D) concepts -> (region-concept contrastive, distillation).

    contrastive: MIL cross-entropy of each region against the pseudo-label embeddings of all N kept regions
        (duplicates included), every region of the same concept a positive.
    distillation: KL(teacher || student) over the whole concept pool, summed over concepts, averaged over regions.
    """
    student = F.normalize(student_regions.float(), dim=-1)
    concepts = F.normalize(concepts.float(), dim=-1)
    contrastive = mil_cross_entropy(student @ concepts[labels].T / temperature,
                                    (labels[:, None] == labels[None, :]).float())
    log_student = F.log_softmax(student @ concepts.T / temperature, dim=-1)
    distill = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return contrastive, distill


def image_text_loss(image: torch.Tensor, text: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE between (B, D) whole-image region embeddings and (B, D) caption embeddings at a fixed
    temperature, over the batch gathered from all ranks (gradients flow through the gathered copies)."""
    from ..distributed import gather_with_grad
    image, offset = gather_with_grad(F.normalize(image.float(), dim=-1))
    text, _ = gather_with_grad(F.normalize(text.float(), dim=-1))
    logits = image @ text.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class RegionCLIPPretrainer(nn.Module):
    """Region-text pretraining (`PretrainFastRCNN`): a frozen teacher CLIP labels RPN regions with concepts, a
    student image tower (initialised from the teacher) learns from them and from image-caption pairs.

    teacher: the CLIP (frozen; its text tower embeds concepts and captions). concepts: the concept pool (nouns).
    proposer: the frozen class-agnostic RPN; it keeps `proposals` boxes after NMS at `proposal_nms`, of which
        `regions` per image are drawn at random.
    The student's `clip` is what pretraining produces (`student_clip_state`).
    """

    def __init__(self, teacher: CLIPBackbone, concepts: list[str], proposer: RegionProposer, proposals: int = 300,
                 proposal_nms: float = 0.5, regions: int = 100, threshold: float = 0.1,
                 temperature: float = TEMPERATURE, resolution: int | None = None, mode: str = "maskclip",
                 templates: str = "regionclip81"):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.teacher_encoder = RegionEncoder(teacher, resolution, mode)
        tower = image_tower(teacher).requires_grad_(True)
        if tower.arch == "resnet":
            freeze_resnet_tower(tower.visual)
            freeze_batchnorm(teacher.visual)
        self.student = RegionEncoder(tower, resolution, mode)
        self.proposer = proposer.requires_grad_(False)
        self.proposer.network.post_nms_top_n = lambda: proposals
        self.proposer.network.nms_thresh = proposal_nms
        self.regions, self.threshold, self.temperature = regions, threshold, temperature
        embeddings = TextEmbeddingCache().embed(teacher, list(concepts), resolve_templates(templates), raw_mean=True)
        self.register_buffer("concepts", embeddings.to(teacher.device), persistent=False)

    def train(self, mode: bool = True) -> "RegionCLIPPretrainer":
        super().train(mode)
        self.teacher.eval()
        self.proposer.eval()
        return self

    def losses(self, images: torch.Tensor, tokens: torch.Tensor, sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) normalised and padded, tokens (B, L) one caption each, sizes [(H_i, W_i)] ->
        {'loss', 'loss_region_concept', 'loss_distill', 'loss_image_text', 'kept'}."""
        with torch.no_grad():
            features, _ = trunk_map(self.teacher, images)
            proposals, _, _ = self.proposer.network.propose(features.float(), images, sizes)
            boxes = [p[torch.randperm(len(p), device=p.device)[:self.regions]] for p in proposals]
            teacher_regions = self.teacher_encoder(images, boxes)
            probs, keep, labels = pseudo_concepts(teacher_regions, self.concepts, self.threshold, self.temperature)
            eot = tokens.argmax(dim=-1)
            m = self.teacher.model
            text = self.teacher.encode_token_embeddings(m.token_embedding(tokens), eot)
        height, width = images.shape[-2:]
        canvas = images.new_tensor([[0, 0, width, height]], dtype=torch.float32)
        features, stride = self.student.feature_map(images)
        pooled = self.student.pool(features, stride, [torch.cat([b, canvas]) for b in boxes])
        is_canvas = torch.cat([torch.arange(len(b) + 1, device=pooled.device) == len(b) for b in boxes])
        regions = pooled[~is_canvas]
        contrastive, distill = region_concept_losses(regions[keep], probs[keep], labels[keep], self.concepts,
                                                     self.temperature)
        image_text = image_text_loss(pooled[is_canvas], text, self.temperature)
        return {"loss": contrastive + distill + image_text, "loss_region_concept": contrastive,
                "loss_distill": distill, "loss_image_text": image_text, "kept": keep.float().mean()}

    def student_clip_state(self) -> dict[str, torch.Tensor]:
        """The pretrained CLIP as an open_clip state dict: the student's image tower and the teacher's text tower."""
        state = {k: v for k, v in self.teacher.model.state_dict().items() if not k.startswith("visual.")}
        state.update({f"visual.{k}": v for k, v in self.student.clip.visual.state_dict().items()})
        return state
