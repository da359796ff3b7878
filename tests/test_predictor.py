"""Sliding windows, PAMR, key smoothing and the SegmentationPredictor end to end."""
import numpy as np
import torch.nn.functional as F
import pytest
import torch

from ovdense.methods import MaskCLIP, refine_output
from ovdense.ops import PAMR, merge_windows, short_side_size, sliding_windows
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import PRESETS, Protocol
from ovdense.text import TextEmbeddingCache


def test_sliding_windows_cover_the_image_and_touch_the_borders():
    windows = sliding_windows(300, 500, crop=224, stride=112)
    covered = np.zeros((300, 500), dtype=int)
    for y0, y1, x0, x1 in windows:
        assert (y1 - y0, x1 - x0) == (224, 224)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert {w[1] for w in windows} >= {300} and {w[3] for w in windows} >= {500}
    assert len(windows) == 2 * 4  # ceil((300-224)/112)+1 rows, ceil((500-224)/112)+1 columns
    assert sliding_windows(100, 120, crop=224, stride=112) == [(0, 100, 0, 120)]  # small image: one window
    assert sliding_windows(100, 120, crop=None, stride=None) == [(0, 100, 0, 120)]


def test_merge_windows_averages_overlaps():
    windows = [(0, 4, 0, 4), (0, 4, 2, 6)]
    logits = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 3.0)])
    merged = merge_windows(logits, windows, (4, 6))
    assert torch.equal(merged[0, 0], torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))


def test_short_side_size():
    assert short_side_size(375, 500, 336) == (336, 448)
    assert short_side_size(100, 5000, 336) == (41, 2048)  # long side capped
    assert short_side_size(375, 500, None) == (375, 500)


def test_pamr_keeps_constant_masks_and_snaps_to_image_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0  # a vertical edge at column 16
    constant = torch.full((1, 2, 32, 32), 0.5)
    torch.testing.assert_close(PAMR(5)(image, constant), constant)
    # a mask ramping across the edge: PAMR flattens it inside each region but does not mix the regions,
    # while the same refinement on a featureless image blurs the two halves together
    ramp = torch.linspace(0, 1, 32).expand(32, 32)
    mask = torch.stack([1 - ramp, ramp])[None]

    def contrast(m):
        return (m[0, 1, :, 16:].mean() - m[0, 1, :, :16].mean()).item()

    refined = PAMR(10, (1, 2, 4))(image, mask)
    blurred = PAMR(10, (1, 2, 4))(torch.zeros_like(image), mask)
    assert refined[0, 1, :, 16:].std() < 0.5 * mask[0, 1, :, 16:].std()
    assert contrast(refined) >= contrast(mask) - 1e-3
    assert contrast(blurred) < contrast(mask) - 0.05


def test_key_smoothing_replaces_only_unsure_positions():
    cosine = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5]]).view(1, 2, 1, 3)  # third position undecided
    keys = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.1]]).view(1, 2, 1, 3)  # and its key is like the first
    smoothed = refine_output(cosine, keys, smooth=0.9)
    torch.testing.assert_close(smoothed[..., :2], (100 * cosine[..., :2]).softmax(dim=1))  # confidences
    assert smoothed[0, 0, 0, 2] > smoothed[0, 1, 0, 2]  # it now leans to the class of the first position


@pytest.fixture
def predictor(tiny_vit):
    protocol = Protocol("test", short_side=64, crop=32, stride=16, templates="single")
    return SegmentationPredictor(MaskCLIP(tiny_vit, "sclip"), protocol, cache=TextEmbeddingCache())


def test_sliding_window_equals_whole_image_when_the_window_covers_it(tiny_vit, scene):
    results = []
    for crop in (None, 512):
        protocol = Protocol("t", short_side=96, crop=crop, stride=256, templates="single")
        results.append(SegmentationPredictor(MaskCLIP(tiny_vit), protocol)(scene, "red, blue"))
    torch.testing.assert_close(results[0].scores, results[1].scores)
    assert np.array_equal(results[0].labels, results[1].labels)


def test_prediction_at_original_resolution(predictor, scene):
    result = predictor(scene, "red thing, blue thing; navy thing")
    # labels at the image's size, scores at the working size (short side 64)
    assert result.labels.shape == scene.shape[:2] and result.scores.shape == (2, 64, 85)
    assert result.class_names == ["red thing", "blue thing"]
    assert result.labels.dtype == np.int64 and set(np.unique(result.labels)) <= {0, 1}
    segments = result.segments()
    assert abs(sum(s["area"] for s in segments) - 1.0) < 1e-6
    for s in segments:
        x0, y0, x1, y1 = s["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 96


def test_set_image_once_query_many(predictor, scene, monkeypatch):
    predictor.set_image(scene)
    calls = []
    monkeypatch.setattr(predictor.method, "embed_crops", lambda crops: calls.append(1))
    first = predictor.predict("red, blue")
    other = predictor.predict("blue, red, green")
    again = predictor.predict("red, blue")
    assert not calls  # the image was not encoded again
    assert other.scores.shape[0] == 3
    torch.testing.assert_close(again.scores, first.scores)


def test_synonyms_take_the_best_query(tiny_vit, scene):
    """A class's probability is the max over its synonyms of the softmax over all queries."""
    protocol = Protocol("native", short_side=None, crop=64, stride=32, templates="single")
    predictor = SegmentationPredictor(MaskCLIP(tiny_vit), protocol)
    predictor.set_image(scene)
    both = predictor.predict("red; crimson, blue")
    apart = predictor.predict("red, crimson, blue")
    torch.testing.assert_close(both.scores[0], torch.maximum(apart.scores[0], apart.scores[1]))
    torch.testing.assert_close(both.scores[1], apart.scores[2])


def test_background_threshold(predictor, scene):
    predictor.set_image(scene)
    everything = predictor.predict("red, blue", background_threshold=1.0)
    assert everything.class_names[0] == "background" and (everything.labels == 0).all()
    nothing = predictor.predict("red, blue", background_threshold=0.0)
    assert (nothing.labels != 0).all()


def test_area_threshold_drops_small_classes(predictor, scene):
    predictor.set_image(scene)
    plain = predictor.predict("background: wall, red, blue, green")
    areas = np.bincount(plain.labels.flatten(), minlength=4)[1:] / max(1, (plain.labels != 0).sum())
    filtered = predictor.predict("background: wall, red, blue, green", area_threshold=float(areas.max()) - 1e-6)
    kept = set(np.unique(filtered.labels)) - {0}
    assert kept <= {1 + int(areas.argmax())}


def test_prompt_denoising_drops_classes_never_confident():
    cosine = torch.tensor([[0.30, 0.10], [0.10, 0.30], [0.25, 0.25]]).view(1, 3, 1, 2)  # class 2 never wins
    confidence = (100 * cosine).softmax(dim=1).amax(dim=(2, 3))[0]  # 0.993, 0.993, 0.007 at best
    denoised = refine_output(cosine, torch.zeros(1, 4, 1, 2), denoise=0.5)
    assert confidence[2] < 0.5 < confidence[:2].min()
    torch.testing.assert_close(denoised[0, :2], cosine[0, :2])
    assert (denoised[0, 2] == -100).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs(tiny_vit, scene, preset):
    protocol = PRESETS[preset].for_dataset("voc21").updated(templates="single", short_side=64)
    predictor = SegmentationPredictor(MaskCLIP(tiny_vit, protocol.mode or "maskclip"), protocol)
    result = predictor(scene, "background: wall, red, blue")
    assert result.labels.shape == (96, 128)


def test_presets_carry_the_papers_dataset_settings():
    assert PRESETS["sclip"].for_dataset("voc21").area_threshold == 0.1
    assert PRESETS["sclip"].for_dataset("cityscapes").short_side == 560
    assert PRESETS["clearclip"].for_dataset("context60").background_threshold == 0.15
    assert PRESETS["tcl"].for_dataset("voc21").background_threshold == 0.4
    assert PRESETS["naclip"].for_dataset("voc21").crop is None
    assert PRESETS["sclip"].for_dataset("ade150") == PRESETS["sclip"]


def test_predict_before_set_image(predictor):
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict("cat")


@pytest.mark.parametrize("shape", [(4, 2000), (2000, 4), (1, 1), (3, 50)])
@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_rn"])
def test_extreme_aspect_ratios_and_tiny_images(request, backbone, shape):
    """Crops thinner than a patch are zero-padded to one patch instead of crashing the patch embedding."""
    predictor = SegmentationPredictor(MaskCLIP(request.getfixturevalue(backbone)), "default")
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert predictor(image, "red, blue").labels.shape == shape


def test_labels_computed_in_bands_equal_full_resolution(monkeypatch):
    """The banded computation gives the labels of the full K x H x W computation (resize, softmax, area and
    background thresholds)."""
    import ovdense.predictor as module
    from ovdense.text import Vocabulary
    torch.manual_seed(0)
    vocab = Vocabulary.parse("background, red; crimson, blue, green").with_background()
    logits = torch.randn(len(vocab.queries), 9, 13) * 3
    logits[-1] -= 2.5  # green: rare, so that the area threshold drops it
    protocol = Protocol("t", background_threshold=0.45, area_threshold=0.2)
    to_probs = lambda x: module._class_probabilities(x, vocab)  # noqa: E731
    full = to_probs(F.interpolate(logits[None], size=(70, 101), mode="bilinear", align_corners=False)[0])
    areas = torch.bincount(full.argmax(0).flatten(), minlength=len(vocab)).float()
    small = areas <= 0.2 * areas[1:].sum()
    small[0] = False
    full[small] = 0
    expected = full.argmax(0)
    expected[full.amax(0) < 0.45] = 0
    monkeypatch.setattr(module, "_BAND_ELEMENTS", 5 * 101 * len(vocab.queries))  # bands of 5 rows
    labels = module._assign_labels(logits, to_probs, (70, 101), 0, protocol)
    assert small.any() and (labels == expected).float().mean() > 0.999


def test_a_stride_larger_than_the_crop_is_refused():
    from ovdense.errors import UsageError
    with pytest.raises(UsageError, match="stride"):
        Protocol("t", crop=64, stride=112)


def test_synonyms_keep_negative_scores():
    """Key-smoothed confidences can be negative; merging synonyms must not clamp them at 0."""
    import ovdense.predictor as module
    from ovdense.text import Vocabulary
    vocab = Vocabulary.parse("red; crimson, blue")
    scores = torch.tensor([-0.3, -0.2, -0.1]).view(3, 1, 1)
    merged = module._class_probabilities(scores, vocab, softmax=False)
    torch.testing.assert_close(merged.flatten(), torch.tensor([-0.2, -0.1]))


def test_tcl_preset_keeps_the_background_virtual(tiny_vit, scene, monkeypatch):
    """TCL scores only the real classes; its background is the threshold alone, even when the dataset's class list
    gives the background synonyms (kakaobrain/tcl tcl_seg.py: a constant bg_thresh channel)."""
    method = MaskCLIP(tiny_vit)
    asked = []
    embed = method.embed_text
    monkeypatch.setattr(method, "embed_text", lambda queries, *a: asked.append(list(queries)) or embed(queries, *a))
    protocol = PRESETS["tcl"].for_dataset("voc21").updated(short_side=64)
    result = SegmentationPredictor(method, protocol, cache=TextEmbeddingCache())(scene, "background; sky; wall, red, blue")
    assert asked == [["red", "blue"]] and result.class_names == ["background", "red", "blue"]


def test_pamr_affinities_are_computed_once_per_image(tiny_vit, scene, monkeypatch):
    protocol = Protocol("t", short_side=64, crop=32, stride=16, templates="single", pamr_iterations=3,
                        pamr_dilations=(1, 2), pamr_at="original")
    predictor = SegmentationPredictor(MaskCLIP(tiny_vit), protocol, cache=TextEmbeddingCache())
    predictor.set_image(scene)
    calls = []
    affinity = PAMR.affinity
    monkeypatch.setattr(PAMR, "affinity", lambda self, image: calls.append(1) or affinity(self, image))
    first = predictor.predict("red, blue")
    second = predictor.predict("blue, red, green")
    again = predictor.predict("red, blue")
    assert len(calls) == 1 and second.labels.shape == scene.shape[:2]
    assert np.array_equal(first.labels, again.labels)
