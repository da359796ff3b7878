"""TCL: each loss against a direct computation, the decoder, the grounder's gradients, saving, the predictor,
and a short training run on the synthetic world that improves mIoU over its starting point."""
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import load_clip
from ovdense.data.export import export_world
from ovdense.data.synthetic import SyntheticWorld
from ovdense.engine import tcl_train
from ovdense.engine.recipe import load_recipe
from ovdense.engine.tcl_train import TCLRecipe, train_tcl
from ovdense.errors import InputError
from ovdense.eval import SegmentationMetric
from ovdense.methods import load_method
from ovdense.methods.tcl import (TCL, GroundingDecoder, TCLLossWeights, area_loss, extended_info_nce, gumbel_sigmoid,
                                 info_nce, masked_pool, tv_loss)
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import Protocol
from ovdense.text import Vocabulary


def test_gumbel_sigmoid_is_binary_with_straight_through_gradients():
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    hard = gumbel_sigmoid(logits, tau=0.5, hard=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    (hard * torch.arange(64.0).view(8, 8)).sum().backward()
    grad_hard = logits.grad.clone()
    logits.grad = None
    torch.manual_seed(0)  # same noise: the straight-through gradient is the soft sample's gradient
    soft = gumbel_sigmoid(logits, tau=0.5, hard=False)
    (soft * torch.arange(64.0).view(8, 8)).sum().backward()
    torch.testing.assert_close(grad_hard, logits.grad)
    assert torch.equal(hard, (soft > 0.5).float())


def test_tv_and_area_losses():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal neighbour pairs differ, no vertical pair
    assert tv_loss(x).item() == pytest.approx(4 / 12)
    assert tv_loss(x.transpose(2, 3)).item() == pytest.approx(4 / 12)
    assert tv_loss(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0
    assert area_loss(x, 0.4).item() == pytest.approx(0.1)
    assert area_loss(x, 0.0).item() == pytest.approx(0.5)


def test_masked_pool_is_a_weighted_average():
    dense, masks = torch.randn(2, 5, 3, 4), torch.rand(2, 3, 3, 4)
    expected = torch.stack([torch.stack([(dense[b] * masks[b, n]).sum((1, 2)) / masks[b, n].sum()
                                         for n in range(3)]) for b in range(2)])
    torch.testing.assert_close(masked_pool(dense, masks), expected, atol=1e-5, rtol=1e-4)


def test_info_nce_matches_open_clip_and_its_extension():
    image, text = torch.randn(6, 16), torch.randn(6, 16)
    scale = torch.tensor(2.0)
    reference = open_clip.ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp())
    torch.testing.assert_close(info_nce(image, text, scale), reference)
    # if an image pools the same embedding for every text, the extended loss is the plain one
    pooled = image[:, None].expand(6, 6, 16)
    torch.testing.assert_close(extended_info_nce(pooled, text, scale), reference)
    # ... and it reads pooled[i, j] as image i's embedding for text j
    perfect = F.normalize(text, dim=-1)[None].expand(6, 6, 16).clone()
    assert extended_info_nce(perfect, text, torch.tensor(4.0)) < extended_info_nce(pooled, text, torch.tensor(4.0))


def test_decoder_starts_as_an_upsampler():
    decoder = GroundingDecoder(8, layers=2)
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(decoder(x), F.interpolate(x, scale_factor=4, mode="nearest"))


@pytest.fixture(scope="module")
def tcl(tiny_model_configs):
    torch.manual_seed(0)
    return TCL(load_clip("tiny-vit", "random"), kp_weight=0.3)


def test_losses_train_the_grounder_only(tcl):
    images = torch.randn(4, 3, 64, 64)
    out = tcl.losses(images, ["a red star", "grass", "sky", "a blue circle"], TCLLossWeights())
    expected = {"area_loss", "neg_area_loss", "tv_mask_loss", "tv_dense_loss", "feature_tcl_loss", "image_tcl_loss"}
    assert expected < set(out) and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], sum(out[k] for k in expected))
    tcl.zero_grad()
    out["image_tcl_loss"].backward(retain_graph=True)
    assert tcl.w.grad is not None and tcl.w.grad.abs() > 0  # through the straight-through mask and frozen CLIP
    assert all(p.grad is None for p in tcl.backbone.parameters())
    tcl.zero_grad()
    out = tcl.losses(images, ["a red star", "grass", "sky", "a blue circle"], TCLLossWeights(), train_block=False)
    out["loss"].backward()
    assert all(p.grad is None for p in tcl.block.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tcl.decoder.parameters())


def test_save_load_and_predict(tcl, tmp_path, scene):
    path = tcl.save(tmp_path / "tcl.safetensors")
    loaded = load_method("tcl", checkpoint=str(path))
    crops = torch.randn(2, 3, 64, 64)
    text = torch.randn(3, 32)
    torch.testing.assert_close(loaded.crop_logits(loaded.embed_crops(crops), text),
                               tcl.eval().crop_logits(tcl.embed_crops(crops), text))
    with pytest.raises(ValueError, match="checkpoint"):
        load_method("tcl")
    predictor = SegmentationPredictor(loaded, Protocol("t", short_side=64, crop=64, stride=32, templates="none"))
    result = predictor(scene, "red, blue")
    scores = result.scores
    assert scores.shape == (2, 64, 85) and 0 <= scores.min() and scores.max() <= 1  # masks, not a softmax
    assert not torch.allclose(scores.sum(0), torch.ones(64, 85))
    everything_background = predictor.predict("red, blue", background_threshold=1.0)
    background = everything_background.class_names.index("background")
    assert (everything_background.labels == background).all()


def _miou(method, world, scenes):
    predictor = SegmentationPredictor(method, Protocol("t", short_side=None, crop=None, templates="none"))
    metric = SegmentationMetric(len(world.classes))
    vocabulary = Vocabulary.coerce(world.classes)
    for i in range(scenes):
        scene = world.scene(1_000_000_000 + i)
        metric.update(predictor(scene.image, vocabulary).labels, scene.semantic)
    return metric.compute()["mIoU"]


def test_short_training_run_improves_miou(tmp_path):
    """A few dozen steps on synthetic captions (phrases) with the shipped tiny CLIP raise val mIoU."""
    world = SyntheticWorld(64, seed=0, max_objects=3)
    export_world(world, tmp_path / "world", {"train": 300}, progress=False)
    recipe = TCLRecipe(model="ovdense-tiny-vit", weights="synthetic", method={"kp_weight": 0.0},
                       data={"sources": [str(tmp_path / "world" / "grounding_train.jsonl")], "text": "phrase",
                             "image_size": 64, "scale": [1.0, 1.0]},
                       train={"steps": 40, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.05, "warmup_steps": 5,
                              "grad_clip": 5.0, "log_every": 5, "checkpoint_every": 20})
    torch.manual_seed(0)
    start = _miou(TCL(load_clip("ovdense-tiny-vit", "synthetic"), kp_weight=0.0).eval(), world, 30)
    torch.manual_seed(0)
    model, path = train_tcl(recipe, tmp_path / "run", progress=False)
    assert path.is_file()
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    losses = [float(dict(zip(lines[0].split(","), row.split(",")))["loss"]) for row in lines[1:]]
    assert np.mean(losses[-2:]) < losses[0]
    assert _miou(model, world, 30) > start + 1.0


def test_recipes_parse():
    for name in ("tcl_tiny_synthetic", "tcl_vit_b16_cc3m_cc12m"):
        recipe = load_recipe(TCLRecipe, f"configs/{name}.yaml")
        assert recipe.train["steps"] > 0 and recipe.data["sources"]


def test_recipe_can_normalise_with_imagenet_statistics(tmp_path, monkeypatch):
    """data.normalize: 'imagenet' trains on ImageNet's mean / std, as kakaobrain/tcl does (us.DEFAULT_MEAN)."""
    (tmp_path / "captions.jsonl").write_text("")
    data = {"sources": str(tmp_path / "captions.jsonl"), "normalize": "imagenet"}
    with pytest.raises(InputError, match=r"data\.normalize: unknown value 'clip'"):
        TCLRecipe(model="tiny-vit", weights="random", data={**data, "normalize": "clip"}).validate()
    seen = {}

    class Stop(Exception):
        pass

    def dataset(sources, size, mean, std, **kwargs):
        seen.update(mean=mean, std=std)
        raise Stop  # before any training

    monkeypatch.setattr(tcl_train, "ImageTextDataset", dataset)
    with pytest.raises(Stop):
        train_tcl(TCLRecipe(model="tiny-vit", weights="random", data=data), tmp_path / "run", progress=False)
    assert seen == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
