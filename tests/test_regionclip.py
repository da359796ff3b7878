"""RegionCLIP and the detection layer: shapes, each loss against a direct computation, pseudo-labelling rules,
post-processing, the CLIP parity of the ResNet region path, a short pretraining run, the predictor, the converter."""
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms

from ovdense.detection.postprocess import select_detections, soft_nms
from ovdense.detection.predictor import DetectionPredictor
from ovdense.detection.rpn import ProposalNetwork
from ovdense.detection.structures import DetectionResult
from ovdense.errors import CheckpointError
from ovdense.methods.regionclip import (RegionCLIPDetector, RegionCLIPPretrainer, RegionEncoder, RegionProposer,
                                        box_classification_loss, image_text_loss, mil_cross_entropy, pseudo_concepts,
                                        region_concept_losses, region_logits)

RPN = {"sizes": [16, 32], "aspect_ratios": [1.0], "pre_nms_top_n": [200, 200], "post_nms_top_n": [50, 50]}


# ------------------------------------------------------------------------------------------------ losses
def test_focal_scaled_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4) * 3, torch.tensor([0, 3, 3, 1, 2, 3])  # class 3 is the background
    probs = logits.softmax(dim=1)
    expected = np.mean([-math.log(probs[i, y]) * (1 - probs[i, y]) ** 0.5 * (0.2 if y == 3 else 1.0)
                        for i, y in enumerate(labels.tolist())])
    assert box_classification_loss(logits, labels, 0.5, 0.2).item() == pytest.approx(expected, rel=1e-5)
    # LVIS: no focal term, PyTorch's weighted mean (divided by the summed weights)
    weights = [0.8 if y == 3 else 1.0 for y in labels.tolist()]
    weighted = sum(-math.log(probs[i, y]) * w for i, (y, w) in enumerate(zip(labels.tolist(), weights))) / sum(weights)
    assert box_classification_loss(logits, labels, None, 0.8).item() == pytest.approx(weighted, rel=1e-5)


def test_focal_loss_gradient_is_finite_when_a_region_is_certain():
    logits = torch.tensor([[0.0, 2000.0, 0.0]], requires_grad=True)  # p_t == 1 in float32
    box_classification_loss(logits, torch.tensor([1])).backward()
    assert torch.isfinite(logits.grad).all()


def test_background_logit_is_zero_and_foreground_is_cosine_over_temperature():
    regions, text = torch.randn(5, 8), torch.randn(3, 8)
    logits = region_logits(regions, text)
    assert logits.shape == (5, 4) and torch.all(logits[:, -1] == 0)
    assert torch.allclose(logits[:, :3], F.cosine_similarity(regions[:, None], text[None], dim=-1) / 0.01, atol=1e-3)


def test_pseudo_labels_keep_confident_regions_and_fall_back_to_all():
    concepts = torch.eye(3)
    regions = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0, 0, 1.0]])
    probs, keep, labels = pseudo_concepts(regions, concepts, threshold=0.9)
    expected = (regions / regions.norm(dim=1, keepdim=True) @ concepts.T / 0.01).softmax(dim=1)
    assert torch.allclose(probs, expected) and labels.tolist() == [0, 0, 2]
    assert keep.tolist() == [True, False, True]  # the middle one's best concept has 1/3
    _, keep, _ = pseudo_concepts(regions[1:2], concepts, threshold=0.9)
    assert keep.tolist() == [True]  # none passes: all are kept, as the official code does


def test_region_concept_losses_match_the_closed_forms():
    torch.manual_seed(1)
    student, concepts = torch.randn(5, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 2, 0, 3, 2])
    teacher = torch.randn(5, 4).softmax(dim=1)
    contrastive, distill = region_concept_losses(student, teacher, labels, concepts, temperature=0.1)
    s = F.normalize(student, dim=1) @ F.normalize(concepts, dim=1).T / 0.1  # (5, 4) against every concept
    counts = torch.bincount(labels, minlength=4).float()
    # duplicates share a logit: -log(n_c e^{s_ic} / sum_c' n_c' e^{s_ic'})
    expected = -torch.log(counts[labels] * s.gather(1, labels[:, None])[:, 0].exp()
                          / (counts[None] * s.exp()).sum(dim=1)).mean()
    assert contrastive.item() == pytest.approx(expected.item(), rel=1e-5)
    kl = (teacher * (teacher.log() - s.log_softmax(dim=1))).sum() / 5
    assert distill.item() == pytest.approx(kl.item(), rel=1e-5)
    assert mil_cross_entropy(torch.zeros(2, 4), torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]])).item() == \
        pytest.approx((-math.log(0.5) - math.log(0.25)) / 2)


def test_image_text_loss_is_symmetric_cross_entropy():
    torch.manual_seed(2)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    logits = F.normalize(image, dim=1) @ F.normalize(text, dim=1).T / 0.01
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert image_text_loss(image, text).item() == pytest.approx(expected.item(), rel=1e-5)


# -------------------------------------------------------------------------------------- post-processing
def _naive_soft_nms(boxes, scores, sigma, prune):
    from torchvision.ops import box_iou
    boxes, scores = boxes.clone(), scores.clone()
    index, kept = list(range(len(scores))), []
    while index:
        best = max(index, key=lambda i: scores[i])
        kept.append((best, float(scores[best])))
        index.remove(best)
        for i in index:
            scores[i] *= math.exp(-float(box_iou(boxes[best:best + 1], boxes[i:i + 1])) ** 2 / sigma)
        index = [i for i in index if scores[i] > prune]
    return kept


def test_soft_nms_matches_a_naive_loop_and_hard_mode_is_nms():
    torch.manual_seed(3)
    xy = torch.rand(90, 2) * 50  # more than 64 rounds: the dead columns are dropped twice on the way
    boxes = torch.cat([xy, xy + 10 + torch.rand(90, 2) * 20], dim=1)
    scores = torch.rand(90)
    kept, new_scores = soft_nms(boxes, scores, sigma=0.5, min_score=0.001)
    reference = _naive_soft_nms(boxes, scores, 0.5, 0.001)
    assert kept.tolist() == [i for i, _ in reference]
    assert torch.allclose(new_scores, torch.tensor([s for _, s in reference]), atol=1e-6)
    hard, _ = soft_nms(boxes, scores, iou_threshold=0.5, method="hard", min_score=0.0)
    assert hard.tolist() == nms(boxes, scores, 0.5).tolist()
    # class-wise: all classes advance together, yet each class gets exactly its own naive loop
    labels = torch.randint(0, 4, (90,))
    labels[labels == 2] = 3  # a class with no box in between
    kept, new_scores = soft_nms(boxes, scores, sigma=0.5, min_score=0.001, labels=labels)
    expected = []
    for label in labels.unique().tolist():
        index = (labels == label).nonzero(as_tuple=True)[0]
        expected += [(int(index[i]), s) for i, s in _naive_soft_nms(boxes[index], scores[index], 0.5, 0.001)]
    assert kept.tolist() == [i for i, _ in expected]
    assert torch.allclose(new_scores, torch.tensor([s for _, s in expected]), atol=1e-6)


def test_select_detections_thresholds_suppresses_per_class_and_caps():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60.]])
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.01], [0.6, 0.02]])
    out_boxes, out_scores, labels = select_detections(boxes, scores, score_threshold=0.05, nms="class",
                                                      iou_threshold=0.5)
    # box 1 is suppressed by box 0 in class 0; class 1 keeps box 0 only (the others are under the threshold)
    assert out_scores.tolist() == pytest.approx([0.9, 0.8, 0.6]) and labels.tolist() == [0, 1, 0]
    assert len(select_detections(boxes, scores, 0.05, "none", max_detections=2)[0]) == 2


def test_detection_result_formats():
    result = DetectionResult(torch.tensor([[1, 2, 11, 22], [0, 0, 5, 5.]]), torch.tensor([0.2, 0.9]),
                             torch.tensor([1, 0]), ["heart", "red star"], (30, 40))
    assert result.to_list()[0] == {"score": 0.9, "label": "heart",
                                   "box": {"xmin": 0.0, "ymin": 0.0, "xmax": 5.0, "ymax": 5.0}}
    assert result.coco_results(7, [3, 5])[1] == {"image_id": 7, "category_id": 5, "bbox": [1.0, 2.0, 10.0, 20.0],
                                                 "score": 0.2}


# ------------------------------------------------------------------------------------------- the model
def test_proposal_network_shapes_and_losses():
    network = ProposalNetwork(16, **RPN)
    features, images = torch.randn(2, 16, 6, 8), torch.zeros(2, 3, 48, 64)
    boxes, scores, losses = network.propose(features, images, [(48, 64), (40, 60)],
                                            [{"boxes": torch.tensor([[4, 4, 30, 30.]])}, {"boxes": torch.zeros(0, 4)}])
    assert [len(b) for b in boxes] == [50, 50] and all(((s >= 0) & (s <= 1)).all() for s in scores)
    assert boxes[1][:, 2].max() <= 60 and boxes[1][:, 3].max() <= 40  # clipped to each image's own size
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"} and all(torch.isfinite(v) for v in losses.values())


def test_resnet_region_of_the_whole_image_is_clips_image_embedding(tiny_rn):
    """res4 -> RoIAlign (aligned) -> res5 -> attention pool on the whole-image box equals CLIP's encode_image when
    the RoI grid is the res4 grid itself (RegionCLIP: 14x14 at 224 px)."""
    images = torch.randn(2, 3, 64, 64)
    encoder = RegionEncoder(tiny_rn, resolution=4).eval()  # 64 px: res4 is 4x4
    whole = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])] * 2
    with torch.no_grad():
        regions = encoder(images, whole)
        expected = tiny_rn.model.encode_image(images)
    assert torch.allclose(regions, expected, atol=1e-5)


def test_vit_region_is_the_mean_of_the_dense_map(tiny_vit):
    images = torch.randn(1, 3, 64, 64)
    encoder = RegionEncoder(tiny_vit, resolution=4).eval()
    with torch.no_grad():
        dense = tiny_vit.dense_features(images, "maskclip").features  # (1, D, 4, 4), 16 px cells
        region = encoder(images, [torch.tensor([[16.0, 16.0, 48.0, 48.0]])])
    # aligned RoIAlign samples at 0.75, 1.25, 1.75, 2.25 cells (centres at integers): bilinear weights per axis
    weights = torch.tensor([1.0, 7.0, 7.0, 1.0]) / 16
    expected = torch.einsum("dyx,y,x->d", dense[0], weights, weights)
    assert torch.allclose(region[0], expected, atol=1e-5)


def _detector(clip, names=("circle", "square")):
    torch.manual_seed(0)
    return RegionCLIPDetector(clip, list(names), rpn=RPN, templates="none", roi_batch=16)


def _targets():
    return [{"boxes": torch.tensor([[8, 8, 40, 40.]]), "labels": torch.tensor([1]), "size": torch.tensor([64, 64])}]


def _fit(model, loss, steps: int) -> list[float]:
    """AdamW (lr 1e-3) on the trainable parameters of `model` for `steps` steps of loss()['loss'], re-seeded before
    each (the same sampled proposals and regions every step); the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        values = loss()
        optimizer.zero_grad()
        values["loss"].backward()
        optimizer.step()
        losses.append(values["loss"].item())
    return losses


def test_detector_learns_on_a_fixed_batch_and_embeds_images(tiny_vit):
    detector = _detector(tiny_vit).train()
    images = torch.randn(1, 3, 64, 64)
    losses = _fit(detector, lambda: detector.losses(images, _targets()), steps=12)
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.requires_grad for p in detector.proposals.parameters())
    embedded = detector.eval().embed_image(images, [(64, 64)])[0]
    count = len(embedded["boxes"])
    assert 0 < count <= 50 and embedded["boxes"].shape == (count, 4)
    assert embedded["embeddings"].shape == (count, tiny_vit.embed_dim) and embedded["objectness"].shape == (count,)


def test_detector_save_and_load_give_the_same_detections(tiny_vit, tmp_path, scene):
    detector = _detector(tiny_vit).eval()
    path = detector.save(tmp_path / "det.safetensors", preset="synthetic-detection")
    loaded = RegionCLIPDetector.from_checkpoint(path)
    first = DetectionPredictor(detector, "synthetic-detection")(scene, "red, blue", score_threshold=0.0)
    second = DetectionPredictor(loaded, "synthetic-detection")(scene, "red, blue", score_threshold=0.0)
    assert len(first) and torch.equal(first.boxes, second.boxes) and torch.equal(first.scores, second.scores)


def test_predictor_embeds_the_image_once_and_a_cached_vocabulary_costs_no_text_encoding(tiny_vit, scene, monkeypatch):
    predictor = DetectionPredictor(_detector(tiny_vit), "synthetic-detection")
    predictor.set_image(scene)
    predictor.detect("red, blue")
    calls = []
    monkeypatch.setattr(tiny_vit, "encode_text", lambda *a, **k: calls.append(a) or torch.zeros(1))
    result = predictor.detect("red, blue", score_threshold=0.0, max_detections=5)
    assert not calls and len(result) <= 5 and result.image_size == scene.shape[:2]
    assert (result.boxes[:, 2] <= scene.shape[1]).all() and (result.boxes[:, 3] <= scene.shape[0]).all()
    given = torch.tensor([[0, 0, 64, 96], [64, 0, 128, 96.]])
    predictor.set_image(scene, boxes=given)
    assert predictor.classify_regions("red, blue").shape == (2, 2)


def test_short_pretraining_run_lowers_its_loss(tiny_vit):
    torch.manual_seed(0)
    proposer = RegionProposer(tiny_vit, **RPN)
    model = RegionCLIPPretrainer(tiny_vit, ["circle", "square", "sky"], proposer, regions=8, templates="none")
    images = torch.randn(4, 3, 64, 64)
    tokens = tiny_vit.tokenize(["a red circle", "a blue square", "the sky", "a circle in the sky"])
    losses = _fit(model.train(), lambda: model.losses(images, tokens, [(64, 64)] * 4), steps=15)
    assert losses[-1] < 0.5 * losses[0]
    assert not any(p.requires_grad for p in model.teacher.parameters())
    state = model.student_clip_state()
    fresh = open_clip.create_model("tiny-vit")
    fresh.load_state_dict(state)  # a complete open_clip CLIP: usable as --weights
    assert not torch.equal(state["visual.proj"], tiny_vit.model.state_dict()["visual.proj"])


# ------------------------------------------------------------------------------------------- converter
def _official_resnet(prefix: str, layers=(3, 4, 6, 3), width=64, embed=1024) -> dict[str, tuple]:
    """Key -> shape of RegionCLIP's ModifiedResNet (clip_backbone.py), written from its module definitions:
    3-conv stem, Bottleneck (conv1 1x1, conv2 3x3, conv3 1x1 x4, downsample '0' conv / '1' BN in block 0),
    FrozenBN (weight, bias, running_mean, running_var), AttentionPool2d(7, 32 * width, heads, embed)."""
    shapes = {}

    def bn(name, c):
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}{name}.{part}"] = (c,)
    for i, (cin, cout) in enumerate([(3, width // 2), (width // 2, width // 2), (width // 2, width)], 1):
        shapes[f"{prefix}conv{i}.weight"] = (cout, cin, 3, 3)
        bn(f"bn{i}", cout)
    inplanes = width
    for stage, blocks in enumerate(layers, 1):
        planes = width * 2 ** (stage - 1)
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            shapes[f"{prefix}{name}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes[f"{prefix}{name}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{prefix}{name}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                bn(f"{name}.bn{j}", c)
            if b == 0:
                shapes[f"{prefix}{name}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{name}.downsample.1", planes * 4)
            inplanes = planes * 4
    dim = width * 32
    shapes[f"{prefix}attnpool.positional_embedding"] = (50, dim)
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes[f"{prefix}attnpool.{proj}.weight"], shapes[f"{prefix}attnpool.{proj}.bias"] = (dim, dim), (dim,)
    shapes[f"{prefix}attnpool.c_proj.weight"], shapes[f"{prefix}attnpool.c_proj.bias"] = (embed, dim), (embed,)
    return shapes


def _official_text(prefix: str = "lang_encoder.", width=512, layers=12, embed=1024) -> dict[str, tuple]:
    shapes = {f"{prefix}token_embedding.weight": (49408, width), f"{prefix}positional_embedding": (77, width),
              f"{prefix}ln_final.weight": (width,), f"{prefix}ln_final.bias": (width,),
              f"{prefix}text_projection": (width, embed)}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        shapes.update({block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                       block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                       block + "ln_1.weight": (width,), block + "ln_1.bias": (width,), block + "ln_2.weight": (width,),
                       block + "ln_2.bias": (width,), block + "mlp.c_fc.weight": (4 * width, width),
                       block + "mlp.c_fc.bias": (4 * width,), block + "mlp.c_proj.weight": (width, 4 * width),
                       block + "mlp.c_proj.bias": (width,)})
    return shapes


def _tensors(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}


_OFFLINE_RPN = {"offline_backbone.stem.conv1.weight": (64, 3, 7, 7),
                "offline_proposal_generator.rpn_head.conv.weight": (1024, 1024, 3, 3)}


@pytest.fixture(scope="module")
def rn50():
    return open_clip.create_model("RN50", pretrained=None)


def test_converter_maps_every_key_of_a_pretrained_checkpoint(rn50):
    from ovdense.convert.regionclip import pretrained_to_clip
    official = _tensors({**_official_resnet("backbone."), **_official_resnet("teacher_backbone."),
                         **_official_text(), **_OFFLINE_RPN})
    state = pretrained_to_clip(official, rn50.state_dict())
    rn50.load_state_dict(state)  # strict: every key of the CLIP, nothing else
    assert torch.equal(rn50.visual.layer4[2].conv3.weight, official["backbone.layer4.2.conv3.weight"])
    assert torch.equal(rn50.transformer.resblocks[11].mlp.c_fc.weight,
                       official["lang_encoder.transformer.resblocks.11.mlp.c_fc.weight"])
    assert rn50.logit_scale.item() == pytest.approx(math.log(100))
    broken = dict(official)
    del broken["backbone.layer3.5.bn2.running_var"]
    with pytest.raises(CheckpointError, match="missing"):
        pretrained_to_clip(broken, rn50.state_dict())
    renamed = dict(official)
    renamed["backbone.layer3.5.bn2.running_variance"] = renamed.pop("backbone.layer3.5.bn2.running_var")
    with pytest.raises(CheckpointError):
        pretrained_to_clip(renamed, rn50.state_dict())


def test_converter_maps_a_detector_checkpoint(rn50, tmp_path):
    from ovdense.backbones import CLIPBackbone
    from ovdense.convert.regionclip import detector_state
    clip = CLIPBackbone(rn50, open_clip.get_tokenizer("RN50"), "RN50", "random")
    detector = RegionCLIPDetector(clip, ["person", "car"], rpn={"sizes": [32, 64]}, templates="none")
    official = _tensors({**_official_resnet("backbone."), **_OFFLINE_RPN,
                         "roi_heads.box_predictor.cls_score.weight": (48, 1024),
                         "roi_heads.box_predictor.cls_bg_score.weight": (1, 1024),
                         "roi_heads.box_predictor.test_cls_score.weight": (65, 1024),
                         "roi_heads.box_predictor.bbox_pred.weight": (4, 1024),
                         "roi_heads.box_predictor.bbox_pred.bias": (4,)})
    official["roi_heads.box_predictor.cls_bg_score.weight"].zero_()  # RegionCLIP's background embedding
    state = detector_state(official, detector)
    detector.load_state_dict(state, strict=False)
    assert torch.equal(detector.box_head.weight, official["roi_heads.box_predictor.bbox_pred.weight"])
    assert torch.equal(detector.encoder.clip.visual.attnpool.c_proj.weight, official["backbone.attnpool.c_proj.weight"])
    missing = {k: v for k, v in official.items() if k != "roi_heads.box_predictor.bbox_pred.bias"}
    with pytest.raises(CheckpointError):
        detector_state(missing, detector)
    with pytest.raises(CheckpointError, match="cls_bg_score"):  # a learnt background would change every score
        detector_state({**official, "roi_heads.box_predictor.cls_bg_score.weight": torch.ones(1, 1024)}, detector)


# ------------------------------------------------------------------------------------------- training data
def test_box_training_set_scales_flips_and_draws_the_shortest_edge(tmp_path):
    import json

    from PIL import Image

    from ovdense.data.detection import DetectionDataset
    from ovdense.engine.regionclip_train import BoxTrainingSet
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")  # width 60, height 40
    categories = [{"id": 3, "name": "cat", "split": "base"}, {"id": 7, "name": "dog", "split": "novel"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [6, 4, 12, 8], "area": 96, "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 10, 10, 10], "area": 100, "iscrowd": 0}]
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
                                                 "annotations": annotations, "categories": categories}))
    dataset = DetectionDataset(tmp_path / "a.json")
    data = BoxTrainingSet(dataset, ["cat"], [20, 80], 1000, [0, 0, 0], [1, 1, 1])
    seen = set()
    for epoch in range(12):
        image, target = data.sample(0, epoch)
        height, width = image.shape[1:]
        scale = height / 40
        assert height in (20, 80) and width == 60 * scale and target["size"].tolist() == [height, width]
        assert target["labels"].tolist() == [0]  # the novel dog is left out
        box = torch.tensor([6, 4, 18, 12]) * scale
        flipped = torch.tensor([width - box[2], box[1], width - box[0], box[3]])
        assert torch.allclose(target["boxes"][0], box) or torch.allclose(target["boxes"][0], flipped)
        seen.add((height, torch.allclose(target["boxes"][0], box)))
    assert len(seen) == 4  # both sizes, flipped and not
    assert torch.equal(data.sample(0, 5)[0], data.sample(0, 5)[0])  # drawn from (seed, epoch, index)
