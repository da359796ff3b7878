"""DenseCLIP: context prompts, the vision-to-language decoder, the score map, the auxiliary loss,
augmentations, save/load and inference, resume after a kill, and a short run whose loss falls."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import load_clip
from ovdense.data import SegmentationDataset
from ovdense.data.export import export_world
from ovdense.data.synthetic import SyntheticWorld
from ovdense.data.transforms import AugmentedSegmentation, SegmentationAugment
from ovdense.engine import TrainConfig, Trainer
from ovdense.engine.denseclip_train import DenseCLIPRecipe, _Losses, train_denseclip
from ovdense.engine.recipe import load_recipe
from ovdense.methods import load_method
from ovdense.methods.denseclip import DenseCLIP
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import Protocol

NAMES = ["sky", "grass", "red star", "circle"]
SMALL = {"decoder_width": 32, "decoder_heads": 2, "decoder_layers": 1, "fpn_channels": 16}


@pytest.fixture(scope="module")
def vit(tiny_model_configs):
    return load_clip("tiny-vit", "random")


def _model(backbone, **kwargs):
    torch.manual_seed(0)
    return DenseCLIP(backbone, NAMES, **{**SMALL, **kwargs})


def test_context_prompts_enter_the_frozen_text_tower(vit):
    model = _model(vit)
    tokens = model.prompt.tokenize(["grass", "red star"])
    assert tokens.shape == (2, 5)
    words = vit.model.token_embedding(tokens)
    contexts = model.prompt.contexts
    sequence = torch.cat([words[:, :1], contexts.expand(2, -1, -1), words[:, 1:]], dim=1)
    expected = vit.encode_token_embeddings(sequence, tokens.argmax(dim=-1) + contexts.shape[1])
    torch.testing.assert_close(model.prompt(tokens)[0], expected)
    model.prompt(tokens).sum().backward()
    assert contexts.grad is not None and contexts.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in vit.model.named_parameters() if not n.startswith("visual"))
    with pytest.raises(ValueError, match="longer"):
        model.prompt.tokenize(["a very long class name indeed"])


def test_post_model_prompting_starts_near_the_plain_text(vit):
    model = _model(vit).eval()
    image = model.encode_image(torch.randn(2, 3, 64, 64))
    prompted = model.text_embeddings(model.class_tokens, image)
    plain = model.prompt(model.class_tokens).expand(2, -1, -1)
    visual = torch.cat([image["global"][:, None], image["dense"].flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(prompted, plain + 1e-4 * model.context_decoder(plain, visual))
    assert (prompted - plain).abs().max() < 1e-3 and model.gamma.shape == (vit.embed_dim,)
    pre = _model(vit, prompting="pre").eval()
    assert pre.text_embeddings(pre.class_tokens, image).shape == (2, len(NAMES), vit.embed_dim)


def test_score_map_and_auxiliary_loss(vit):
    model = _model(vit).eval()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, len(NAMES), (2, 64, 64))
    labels[0, :8] = 255
    image = model.encode_image(images)
    text = model.text_embeddings(model.class_tokens, image)
    expected = torch.stack([torch.stack([F.cosine_similarity(image["dense"][b], text[b, k][:, None, None], dim=0)
                                         for k in range(len(NAMES))]) for b in range(2)])
    score_map = model.score_map(image, text)
    torch.testing.assert_close(score_map, expected, atol=1e-5, rtol=1e-4)
    out = model(images)
    assert out["logits"].shape[1] == len(NAMES) and out["score_map"].shape == (2, len(NAMES), 4, 4)
    losses = model.losses(images, labels)
    up = F.interpolate(score_map / 0.07, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["aux_loss"], 0.4 * F.cross_entropy(up, labels, ignore_index=255))
    torch.testing.assert_close(losses["loss"], losses["decode_loss"] + losses["aux_loss"])


def test_loss_average_all_counts_ignored_pixels_as_zero(vit):
    """loss_average='all' is mmseg < 0.23's mean over every pixel (what the official models were trained with)."""
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, len(NAMES), (2, 64, 64))
    labels[:, :16] = 255
    valid = _model(vit).eval().losses(images, labels)  # _model seeds: the two models are the same
    every = _model(vit, loss_average="all").eval().losses(images, labels)
    share = float((labels != 255).float().mean())
    for key in ("decode_loss", "aux_loss"):
        torch.testing.assert_close(every[key], valid[key] * share)


def test_default_levels_and_pyramid_follow_the_official_vit(vit):
    model = _model(vit)
    assert model.levels == [0, 0, 0, 1] and model.score_level == 2 and model.min_crop_patches == 2  # patch 16
    maps = [torch.randn(1, 64, 4, 6) for _ in range(4)]
    assert [tuple(m.shape[-2:]) for m in model.pyramid(maps)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(isinstance(op, torch.nn.GroupNorm) or isinstance(op[0], torch.nn.GroupNorm)
               for op in model.pyramid.ops)
    tiny8 = load_clip("ovdense-tiny-vit", "random")  # patch 8: 2x up, as is, 2x and 4x down; blocks 0-3 of 4
    model8 = DenseCLIP(tiny8, NAMES, **SMALL)
    assert model8.levels == [0, 1, 2, 3] and model8.score_level == 1 and model8.min_crop_patches == 4
    maps = [torch.randn(1, 128, 8, 12) for _ in range(4)]
    assert [tuple(m.shape[-2:]) for m in model8.pyramid(maps)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    grid8 = DenseCLIP(tiny8, NAMES, pyramid="grid", **SMALL)  # patch 16's ops: strides 2-16 with patch 8
    assert grid8.score_level == 2 and grid8.min_crop_patches == 2 and grid8.config["pyramid"] == "grid"
    assert [tuple(m.shape[-2:]) for m in grid8.pyramid(maps)] == [(32, 48), (16, 24), (8, 12), (4, 6)]


def test_train_size_resizes_the_positional_grid_bilinearly_once(tiny_model_configs):
    rn = load_clip("tiny-rn", "random")
    pos = rn.visual.attnpool.positional_embedding.detach().clone()  # 2 x 2 grid for 64 px
    model = _model(rn, train_size=96)
    resized = rn.visual.attnpool.positional_embedding
    expected = F.interpolate(pos[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2), size=(3, 3), mode="bilinear")
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(9, -1))
    assert resized.requires_grad and model.config["train_size"] == 96 and rn.image_size == 96


def test_resnet_and_baseline(tiny_model_configs):
    rn = load_clip("tiny-rn", "random")
    model = _model(rn)
    assert model.score_level == 3 and model(torch.randn(2, 3, 64, 64))["logits"].shape == (2, 4, 16, 16)
    baseline = _model(rn, language_guidance=False)
    assert not hasattr(baseline, "prompt") and set(baseline.losses(torch.randn(2, 3, 64, 64),
                                                                  torch.zeros(2, 64, 64, dtype=torch.long))) == {
        "decode_loss", "loss"}
    with pytest.raises(ValueError, match="score map"):
        _model(rn, language_guidance=False, inference="score_map")


def test_augmentation_keeps_pixels_and_labels_together():
    image = np.zeros((48, 80, 3), dtype=np.uint8)
    label = np.zeros((48, 80), dtype=np.int64)
    image[:, 40:] = 255
    label[:, 40:] = 1
    augment = SegmentationAugment(crop=64, scale=(128, 64), ratio_range=(0.5, 2.0), flip=True, photometric=False)
    for seed in range(8):
        pixels, labels = augment(image, label, np.random.default_rng(seed), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        assert pixels.shape == (3, 64, 64) and labels.shape == (64, 64)
        valid = labels != 255
        white = pixels[0] > 0.5
        assert (white[valid] == (labels[valid] == 1)).float().mean() > 0.95  # same geometry (bilinear edges aside)
        assert (pixels[:, ~valid] == 0).all()  # padding
    a = augment(image, label, np.random.default_rng(3), (0.5,) * 3, (0.5,) * 3)
    b = augment(image, label, np.random.default_rng(3), (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    export_world(SyntheticWorld(64, seed=0, max_objects=3), root, {"train": 64, "val": 8}, progress=False)
    return root


def _trainer(backbone_weights, root, out, steps):
    torch.manual_seed(0)
    backbone = load_clip("ovdense-tiny-vit", backbone_weights)
    data = SegmentationDataset("folder", root, "train")
    model = DenseCLIP(backbone, data.vocabulary.names, **SMALL)
    dataset = AugmentedSegmentation(data, SegmentationAugment(crop=64, scale=(256, 64), ratio_range=(0.75, 1.5),
                                                              flip=False), backbone.image_mean, backbone.image_std)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, weight_decay=1e-4, warmup_steps=2, schedule="poly",
                         lr_mult={"denseclip.backbone": 0.1}, log_every=1, checkpoint_every=1, grad_clip=None)
    return Trainer(_Losses(model), lambda wrapped, batch: wrapped(*batch), dataset, config, out, progress=False)


def _losses(out):
    with open(out / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_resume_after_kill_gives_the_same_next_step(world_folder, tmp_path):
    _trainer("synthetic", world_folder, tmp_path / "straight", 3).fit()
    _trainer("synthetic", world_folder, tmp_path / "killed", 3).fit(max_steps=2)  # "killed" after step 2
    resumed = _trainer("synthetic", world_folder, tmp_path / "killed", 3)
    resumed.fit()
    assert resumed.step == 3
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")


def test_short_run_loss_falls_then_predicts(world_folder, tmp_path, caplog):
    recipe = DenseCLIPRecipe(model="ovdense-tiny-vit", weights="synthetic", method=SMALL,
                             data={"dataset": "folder", "root": str(world_folder), "split": "train",
                                   "augment": {"crop": 64, "scale": [256, 64], "ratio_range": [0.75, 1.5],
                                               "flip": False}},
                             eval={"dataset": "folder", "root": str(world_folder), "split": "val", "limit": 4,
                                   "preset": "synthetic"},
                             train={"steps": 30, "batch_size": 8, "lr": 2e-3, "weight_decay": 1e-4,
                                    "warmup_steps": 3, "lr_mult": {"denseclip.backbone": 0.1}, "log_every": 1,
                                    "checkpoint_every": 10, "eval_every": 30, "grad_clip": None})
    model, path = train_denseclip(recipe, tmp_path / "run", progress=False)
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # the head starts near uniform (mmseg init)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert float(list(csv.DictReader(handle))[-1]["mIoU"]) > 0
    loaded = load_method("denseclip", checkpoint=str(path))
    crops = torch.randn(2, 3, 64, 64)
    text = loaded.embed_text(loaded.class_names)
    torch.testing.assert_close(loaded.crop_logits(loaded.embed_crops(crops), text),
                               model.crop_logits(model.embed_crops(crops), text))
    predictor = SegmentationPredictor(loaded, Protocol("t", short_side=64, crop=64, stride=64, templates="none"))
    with caplog.at_level("WARNING", logger="ovdense"):
        result = predictor(np.zeros((64, 64, 3), np.uint8), ["sky", "grass", "unicorn"])
    assert "never predicts" in caplog.text
    assert 2 not in np.unique(result.labels)  # a class the head was not trained on is never predicted
    # the head's logits go into the softmax as they are (no cosine logit scale)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    scores = predictor(image, ["sky", "grass"]).scores
    head = loaded.crop_logits(predictor._image["embedded"], loaded.embed_text(["sky", "grass"]))
    expected = F.interpolate(head, size=(64, 64), mode="bilinear", align_corners=False)[0].softmax(dim=0)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="score_map"):
        predictor(np.zeros((64, 64, 3), np.uint8), ["unicorn"])
    open_vocabulary = DenseCLIP.from_checkpoint(path, inference="score_map")
    result = SegmentationPredictor(open_vocabulary, predictor.protocol)(np.zeros((64, 64, 3), np.uint8), ["unicorn", "sky"])
    assert result.scores.shape == (2, 64, 64)


def test_recipes_parse():
    for name in ("denseclip_tiny_synthetic", "denseclip_baseline_tiny_synthetic", "denseclip_r50_ade20k",
                 "denseclip_r101_ade20k", "denseclip_vit_b16_ade20k", "fpn_clip_r50_ade20k"):
        recipe = load_recipe(DenseCLIPRecipe, f"configs/{name}.yaml")
        assert recipe.train["steps"] > 0 and recipe.data["dataset"]


def test_a_name_outside_the_training_classes_changes_nothing_under_pamr():
    """The shipped head with the `synthetic` preset (PAMR on): adding an unknown name leaves every label as it was
    (an -inf logit once turned the whole map into NaN and then into class 0)."""
    from ovdense.data.export import scene_index
    from ovdense.shipped import shipped
    method = load_method("denseclip", checkpoint=str(shipped("segmenter", "denseclip").path)).eval()
    predictor = SegmentationPredictor(method, "synthetic")
    image = SyntheticWorld().scene(scene_index("val", 0)).image
    known = predictor(image, ["sky", "sand"]).labels
    assert len(np.unique(known)) == 2
    assert np.array_equal(predictor(image, ["sky", "sand", "a corgi"]).labels, known)
