"""GLIP: prompts and positive maps, ATSS, the fusion layer, the token loss, score aggregation, learning, and the CLI."""
import json
import math

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from ovdense.cli import main
from ovdense.detection import atss
from ovdense.detection.grounding import (caption_prompt, chunk_classes, class_prompt, clean_name, positive_map,
                                         training_prompt)
from ovdense.detection.predictor import GroundingPredictor
from ovdense.errors import InputError
from ovdense.methods.glip import FusionLayer, GLIPDetector, _reused, token_focal_loss
from ovdense.text.tokens import CLIPTokenText

TINY = {"channels": 32, "layers": 2, "fusion_dim": 64, "fusion_heads": 2, "text_heads": 2, "groups": 8}


@pytest.fixture(scope="module")
def glip(tiny_rn):
    torch.manual_seed(0)
    return GLIPDetector(tiny_rn, **TINY)


# ------------------------------------------------------------------------------------------ prompts and tokens
def test_class_prompt_joins_cleaned_names_and_records_their_spans():
    prompt = class_prompt(["heart", "red_star", "bow_(weapon)"])
    assert prompt.caption == "heart. red star. bow "
    assert [[prompt.caption[s:e] for s, e in spans] for spans in prompt.spans] == [["heart"], ["red star"], ["bow "]]
    assert clean_name("traffic_light") == "traffic light"


def test_clip_tokens_carry_character_spans_and_equal_open_clip_tokens(tiny_rn):
    text = CLIPTokenText(tiny_rn)
    caption = "heart. red star. bar"
    ids, spans = text.token_spans(caption)
    assert ids == tiny_rn.tokenizer.encode(caption)
    assert [caption[s:e] for s, e in spans] == ["heart", ".", "red", "star", ".", "bar"]
    tokenized = text.tokenize([caption, "bar"])
    assert tokenized.ids.shape == (2, 8) and tokenized.mask.sum(1).tolist() == [8, 3]
    assert tokenized.ids[0, 0] == tiny_rn.tokenizer.sot_token_id and tokenized.ids[0, 7] == tiny_rn.tokenizer.eot_token_id
    with pytest.raises(InputError, match="tokens long"):
        text.tokenize(["word " * 100])
    assert text.tokenize(["word " * 100], truncate=True).ids.shape[1] == text.max_tokens


def test_positive_map_marks_exactly_the_tokens_of_each_phrase(tiny_rn):
    text = CLIPTokenText(tiny_rn)
    prompt = class_prompt(["heart", "red star", "bar"])
    tokenized = text.tokenize([prompt.caption])
    pm = positive_map(tokenized.offsets[0], prompt.spans, tokenized.ids.shape[1])
    # tokens: <sot> heart . red star . bar <eot>
    assert pm.int().tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0]]


def test_caption_prompt_finds_given_phrases_or_chunks_noun_phrases():
    caption = "A red star left of a small blue circle, and a red star."
    given = caption_prompt(caption, ["red star", "small blue circle"])
    assert given.spans == [[(2, 10), (46, 54)], [(21, 38)]]
    ruled = caption_prompt(caption, chunker="rules")
    assert ruled.phrases == ["A red star", "a small blue circle", "a red star"]
    assert caption_prompt("a black hourglass to the left of a green bar", chunker="rules").phrases == \
        ["a black hourglass", "a green bar"]  # 'the' alone is no phrase
    with pytest.raises(InputError, match="not in the caption"):
        caption_prompt(caption, ["green bar"])
    with pytest.raises(InputError, match="empty"):
        caption_prompt("  ")


def test_chunks_respect_both_the_name_count_and_the_token_limit():
    names = [f"thing{i}" for i in range(10)]
    count = lambda text: len(re.findall(r"\w+|[^\w\s]", text))  # noqa: E731  a word or a mark: one token
    assert chunk_classes(names, count, max_tokens=100, chunk_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # 'thing0. thing1. thing2' is 5 tokens, 7 with the special ones; a fourth name would need 9
    assert chunk_classes(names, count, max_tokens=8, chunk_size=40) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert chunk_classes(names, count, max_tokens=9, chunk_size=40) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(InputError, match="alone takes"):
        chunk_classes(["a very long name indeed"], count, max_tokens=4)


def test_training_prompt_keeps_positives_adds_other_negatives_within_budget():
    pool = [f"class{i}" for i in range(30)]
    count = lambda text: 2  # noqa: E731
    for seed in range(20):
        prompt = training_prompt(["class3", "class7"], pool, count, max_tokens=22, rng=np.random.default_rng(seed))
        assert {"class3", "class7"} <= set(prompt.phrases) and len(set(prompt.phrases)) == len(prompt.phrases)
        assert 2 * len(prompt.phrases) <= 20  # the budget: 22 minus the two special tokens
        assert prompt.caption == ". ".join(prompt.phrases)
    again = training_prompt(["class3"], pool, count, 22, np.random.default_rng(5))
    assert again == training_prompt(["class3"], pool, count, 22, np.random.default_rng(5))


# -------------------------------------------------------------------------------------------------------- ATSS
def test_anchors_and_box_coding_follow_maskrcnn_benchmark():
    anchors = atss.level_anchors(2, 3, 8, 64)
    assert anchors[0].tolist() == [-28.0, -28.0, 35.0, 35.0]  # GLIP's cell anchor for stride 8
    assert anchors[4].tolist() == [-20.0, -20.0, 43.0, 43.0]  # row 1, column 1
    boxes = torch.tensor([[10.0, 20.0, 50.0, 41.0], [0.0, 0.0, 99.0, 9.0]])
    deltas = atss.encode(boxes, anchors[:2])
    assert torch.allclose(atss.decode(deltas, anchors[:2]), boxes, atol=1e-4)
    # a 64 px anchor centred on 3.5; a 41 px box centred 7 px right of it: dx = 10 * 7 / 64, dw = 5 log(41 / 64)
    one = atss.encode(torch.tensor([[-9.5, -28.0, 30.5, 35.0]]), anchors[:1])[0]
    assert one[0].item() == pytest.approx(10 * 7 / 64) and one[2].item() == pytest.approx(5 * math.log(41 / 64))


def test_atss_picks_the_statistically_best_anchors_inside_the_box():
    level0 = atss.level_anchors(8, 8, 8, 16)  # 16 px anchors every 8 px
    level1 = atss.level_anchors(4, 4, 16, 32)
    box = torch.tensor([[16.0, 16.0, 47.0, 47.0]])  # 32 x 32: exactly the level-1 anchor of cell (1, 1)
    matched = atss.atss_assign([level0, level1], box, topk=9)
    positives = set((matched >= 0).nonzero()[:, 0].tolist())
    assert 64 + 5 in positives  # level 1, row 1, column 1: IoU 1
    every = torch.cat([level0, level1])
    iou = atss.pairwise_iou(every, box)[:, 0]
    centre_x, centre_y = (every[:, 0] + every[:, 2]) / 2, (every[:, 1] + every[:, 3]) / 2
    for i in positives:  # positives: centre inside the box and IoU at the threshold or above
        assert 16 < centre_x[i] < 47 and 16 < centre_y[i] < 47
    # the threshold by hand: the 9 nearest anchors of each level, mean + std of their IoUs
    distance = ((centre_x - 31.5) ** 2 + (centre_y - 31.5) ** 2)
    candidates = torch.cat([distance[:64].topk(9, largest=False).indices,
                            64 + distance[64:].topk(9, largest=False).indices])
    threshold = iou[candidates].mean() + iou[candidates].std()
    expected = {int(i) for i in candidates if iou[i] >= threshold and 16.01 < centre_x[i] < 46.99
                and 16.01 < centre_y[i] < 46.99}
    assert positives == expected


def test_atss_gives_a_shared_anchor_to_the_box_it_overlaps_most():
    levels = [atss.level_anchors(8, 8, 8, 16), atss.level_anchors(4, 4, 16, 32)]
    exact, shifted = [16.0, 16.0, 47.0, 47.0], [22.0, 22.0, 53.0, 53.0]  # the level-1 anchor of cell (1, 1) and a shift
    both = torch.tensor([exact, shifted])
    for boxes, owner in ((both, 0), (both.flip(0), 1)):
        matched = atss.atss_assign(levels, boxes, topk=9)
        assert matched[64 + 5] == owner  # positive for both boxes, it goes to the one it equals
        assert {0, 1} <= set(matched.tolist())
    assert (atss.atss_assign(levels, both[:0]) == -1).all()


# ------------------------------------------------------------------------------------------- fusion and losses
def test_fusion_layer_shapes_masking_and_gate_at_init():
    torch.manual_seed(0)
    layer = FusionLayer(v_dim=16, l_dim=12, embed_dim=32, heads=4, init_scale=1 / 6).eval()
    assert torch.equal(layer.gamma_v, torch.full((16,), 1 / 6)) and torch.equal(layer.gamma_l, torch.full((12,), 1 / 6))
    levels = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)]
    text = torch.randn(2, 5, 12)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out_levels, out_text = layer(levels, text, mask)
    assert [m.shape for m in out_levels] == [m.shape for m in levels] and out_text.shape == text.shape
    changed = text.clone()
    changed[1, 3:] = 100 * torch.randn(2, 12)  # padding tokens: the image side must not read them
    again, _ = layer(levels, changed, mask)
    assert all(torch.allclose(a[1], b[1], atol=1e-5) for a, b in zip(out_levels, again))
    changed[1, 0] = 3 * torch.randn(12)  # a real token: it must
    assert not torch.allclose(out_levels[0][1], layer(levels, changed, mask)[0][0][1], atol=1e-3)
    with torch.no_grad():  # the gate: with gamma 0 the output is the normalised input itself
        layer.gamma_v.zero_()
        layer.gamma_l.zero_()
    gated, gated_text = layer(levels, text, mask)
    flat = torch.cat([m.flatten(2).transpose(1, 2) for m in levels], 1)
    normalised = torch.nn.functional.layer_norm(flat, (16,), layer.norm_v.weight, layer.norm_v.bias)
    assert torch.allclose(gated[0].flatten(2).transpose(1, 2), normalised[:, :16], atol=1e-5)
    assert torch.allclose(gated_text, layer.norm_l(text), atol=1e-6)


def test_token_focal_loss_equals_a_direct_computation_over_real_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5)
    targets = torch.rand(2, 7, 5) > 0.7
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected = sum(sigmoid_focal_loss(logits[b, :, mask[b]], targets[b, :, mask[b]].float(), 0.25, 2.0,
                                      reduction="sum") for b in range(2))
    assert token_focal_loss(logits, targets, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_phrase_scores_are_the_mean_of_their_tokens_probabilities_times_centerness(glip, monkeypatch):
    shapes = [(2, 2), (1, 1)]
    logits = torch.tensor([[[0.0, 2.0, -1.0, 3.0], [-9.0, -9.0, -9.0, -9.0], [1.0, 1.0, 1.0, 1.0],
                            [5.0, -5.0, 0.0, 0.0], [2.0, 2.0, -2.0, 0.5]]])
    centerness = torch.tensor([[0.0, 0.0, 1.0, -1.0, 3.0]])
    monkeypatch.setattr(glip, "head", lambda levels, text: {"logits": logits, "deltas": torch.zeros(1, 5, 4),
                                                            "centerness": centerness, "shapes": shapes})
    corners = torch.arange(5, dtype=torch.float32)[:, None] * 20  # anchor a is [20a, 20a, 20a + 10, 20a + 10]
    anchors = torch.cat([corners.expand(5, 2), corners.expand(5, 2) + 10], 1)
    monkeypatch.setattr(glip, "anchors", lambda s: [anchors[:4], anchors[4:]])
    token_map = torch.tensor([[False, True, True, False], [False, False, False, True]])
    found = glip.predict(None, None, [token_map], score_threshold=0.05)[0]
    probs = logits[0].sigmoid()
    phrase = torch.stack([probs[:, 1:3].mean(1), probs[:, 3]], 1)  # (A, P)
    expected = {(a, p): math.sqrt(phrase[a, p] * centerness[0, a].sigmoid())
                for a in range(5) for p in range(2) if phrase[a, p] > 0.05}
    rows = (found["boxes"][:, 0] / 20).round().long().tolist()  # zero deltas: each box is its anchor
    got = {(a, p): s for a, p, s in zip(rows, found["labels"].tolist(), found["scores"].tolist())}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(float(v), rel=1e-5) for k, v in expected.items())


def test_a_short_training_run_lowers_the_loss(tiny_rn):
    torch.manual_seed(0)
    model = GLIPDetector(tiny_rn, **TINY).train()
    text = model.tokenize(["heart. red star. bar", "a red star on grass"])
    pm = [positive_map(text.offsets[0], [[(7, 15)]], text.ids.shape[1]),
          positive_map(text.offsets[1], [[(2, 10)]], text.ids.shape[1])]
    images = torch.randn(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 70.0, 80.0]]), "positive_map": pm[0]},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "positive_map": pm[1]}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)
        values = model.losses(images, text, targets)
        optimizer.zero_grad()
        values["loss"].backward()
        optimizer.step()
        losses.append(values["loss"].item())
    assert losses[-1] < 0.6 * losses[0]
    assert set(values) == {"loss", "loss_token", "loss_reg", "loss_centerness"}


def test_the_coarser_level_reuses_offsets_as_the_official_kernel_reads_them():
    buffer = torch.arange(2 * 18 * 4 * 4, dtype=torch.float32).reshape(2, 18, 4, 4)
    reused = _reused(buffer, (2, 2))
    assert reused.shape == (2, 18, 2, 2)
    assert torch.equal(reused[1].flatten(), buffer[1].flatten()[:72])


def test_the_detector_does_not_change_the_clip_it_was_given(tiny_rn):
    before = {k: v.clone() for k, v in tiny_rn.state_dict().items()}
    flags = [p.requires_grad for p in tiny_rn.parameters()]
    model = GLIPDetector(tiny_rn, **TINY)
    assert [p.requires_grad for p in tiny_rn.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in tiny_rn.state_dict().items())
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")}
    assert trainable == {"visual", "positional_embedding", "token_embedding", "transformer", "ln_final"}
    assert not any(p.requires_grad for p in model.clip.visual.layer1.parameters())  # detectron2's FREEZE_AT 2


def test_a_fine_tuned_token_table_is_saved_as_its_changed_rows(tiny_rn, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ovdense.errors import CheckpointError
    torch.manual_seed(0)
    model = GLIPDetector(tiny_rn, **TINY)
    table = model.clip.model.token_embedding.weight
    with torch.no_grad():
        table[[7, 300, 49000]] += 0.5  # the words training read
    key = "clip.model.token_embedding.weight"
    half = model.save(tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(half), "pt") as handle:
        assert key not in set(handle.keys()) and handle.get_tensor(f"{key}@rows").tolist() == [7, 300, 49000]
        metadata = handle.metadata()
    reloaded = GLIPDetector.from_checkpoint(half)
    expected = tiny_rn.model.token_embedding.weight.detach().clone()  # the rest: those of the CLIP it was built on
    expected[[7, 300, 49000]] = table.detach()[[7, 300, 49000]].half().float()
    assert torch.equal(reloaded.clip.model.token_embedding.weight, expected)
    assert torch.equal(reloaded.bias0, model.bias0.detach().half().float())
    with pytest.raises(CheckpointError, match="the CLIP given is another"):  # the other rows would be another CLIP's
        GLIPDetector.from_checkpoint(half, weights="random:1")
    with torch.no_grad():
        table.mul_(1 - 1e-6)  # weight decay moves every row (in float32)
    with safe_open(str(model.save(tmp_path / "full.safetensors")), "pt") as handle:
        assert key in set(handle.keys())  # more than half the rows changed: the table is kept whole
    for damage, message in ((lambda state: state[f"{key}@rows"].__setitem__(0, 49408), "outside the table"),
                            (lambda state: state.pop(f"{key}@values"), "lack their @values")):
        state = load_file(half)
        damage(state)
        save_file(state, str(tmp_path / "broken.safetensors"), metadata=metadata)
        with pytest.raises(CheckpointError, match=message):
            GLIPDetector.from_checkpoint(tmp_path / "broken.safetensors")


# ------------------------------------------------------------------------------------------ predictor and CLI
@pytest.fixture(scope="module")
def checkpoint(glip, tmp_path_factory):
    return glip.save(tmp_path_factory.mktemp("glip") / "glip.safetensors", preset="glip-synthetic")


def test_detect_and_ground_from_the_cli_equal_the_api(checkpoint, scene, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(scene).save(image)
    out = tmp_path / "out"
    assert main(["--quiet", "ground", str(image), "--caption", "a red square left of a blue square",
                 "--method", "glip", "--checkpoint", str(checkpoint), "--threshold", "0", "--output", str(out)]) == 0
    written = json.loads((out / "scene.json").read_text())
    assert (out / "scene_boxes.png").is_file()
    assert written["caption"] == "a red square left of a blue square"
    assert [p["phrase"] for p in written["phrases"]] == ["a red square", "a blue square"]
    assert [p["spans"] for p in written["phrases"]] == [[[0, 12]], [[21, 34]]]
    predictor = GroundingPredictor(GLIPDetector.from_checkpoint(checkpoint), "glip-synthetic")
    predictor.set_image(str(image))
    api = predictor.ground("a red square left of a blue square").above(0)
    assert [p["boxes"] for p in api.summary()["phrases"]] == [p["boxes"] for p in written["phrases"]]
    for phrase in written["phrases"]:
        for box in phrase["boxes"]:
            b = box["box"]
            assert 0 <= b["xmin"] <= b["xmax"] <= 128 and 0 <= b["ymin"] <= b["ymax"] <= 96
    assert main(["--quiet", "detect", str(image), "--classes", "red square, blue square", "--method", "glip",
                 "--checkpoint", str(checkpoint), "--threshold", "0", "--output", str(out)]) == 0
    detected = json.loads((out / "scene.json").read_text())
    assert detected["classes"] == ["red square", "blue square"] and detected["method"] == "glip"
    assert detected["detections"] == predictor(str(image), "red square, blue square").to_list()


def test_ground_rejects_bad_requests_clearly(checkpoint, scene, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(scene).save(image)
    base = ["--quiet", "ground", str(image), "--method", "glip", "--checkpoint", str(checkpoint), "--output",
            str(tmp_path / "o")]
    assert main(base + ["--caption", "   "]) == 2
    assert main(base + ["--caption", "a red square", "--phrases", "green bar"]) == 1
    assert "not in the caption" in capsys.readouterr().err
    assert main(base + ["--caption", "word " * 100]) == 1
    assert "tokens long" in capsys.readouterr().err


# ------------------------------------------------------------------------------- grounding recall and pseudo-labels
class _FixedGrounder:
    """A stand-in predictor: for each caption, the boxes given for its phrases (best first)."""

    device = torch.device("cpu")

    def __init__(self, answers):
        self.answers, self.images = answers, []

    def set_image(self, image):
        self.images.append(str(image))

    def ground_prompt(self, prompt):
        from ovdense.detection.structures import GroundingResult
        boxes, scores, labels = [], [], []
        for label, found in enumerate(self.answers[prompt.caption]):
            for rank, box in enumerate(found):
                boxes.append(box)
                scores.append(0.9 - 0.1 * rank)
                labels.append(label)
        return GroundingResult(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                               torch.tensor(labels, dtype=torch.long), prompt.phrases, (64, 64),
                               caption=prompt.caption, spans=prompt.spans)


def _grounding_file(tmp_path):
    records = [
        {"image": "a.png", "caption": "a red star above a blue circle",
         "phrases": [{"text": "red star", "span": [2, 10], "category": "star", "boxes": [[0, 0, 10, 10]]},
                     {"text": "blue circle", "span": [19, 30], "category": "circle", "boxes": [[20, 20, 40, 40]]}]},
        {"image": "a.png", "caption": "a heart on sand",
         "phrases": [{"text": "heart", "span": [2, 7], "category": "heart", "boxes": [[5, 5, 25, 25]]},
                     {"text": "sand", "span": [11, 15], "category": "sand", "boxes": []}]},
    ]
    path = tmp_path / "grounding_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "world.json").write_text(json.dumps({"stuff": ["sand"], "base": ["star", "circle"],
                                                     "novel": ["heart"]}))
    return path


def test_grounding_recall_counts_each_boxed_phrase_at_each_k(tmp_path):
    from ovdense.eval.grounding import evaluate_grounding
    far, off = [50, 50, 60, 60], [0, 0, 30, 30]  # IoU 0 with everything here; IoU 0.44 with the heart
    answers = {"a red star above a blue circle": [[[1, 1, 10, 10]], [far] * 5 + [[21, 20, 40, 40]]],
               "a heart on sand": [[off], []]}
    metrics = evaluate_grounding(_FixedGrounder(answers), _grounding_file(tmp_path), progress=False)
    # the star is found at rank 1, the circle at rank 6, the heart never (IoU 0.44); the sand has no boxes
    assert metrics["phrases"] == 3 and metrics["phrases_base"] == 2 and metrics["phrases_novel"] == 1
    assert metrics["R@1"] == pytest.approx(100 / 3) and metrics["R@5"] == pytest.approx(100 / 3)
    assert metrics["R@10"] == pytest.approx(200 / 3) and metrics["R@any"] == pytest.approx(200 / 3)
    assert metrics["R@1_base"] == 50 and metrics["R@10_base"] == 100 and metrics["R@any_novel"] == 0


def test_pseudo_labels_keep_confident_boxes_and_drop_captions_without_any(tmp_path):
    from ovdense.engine.glip_train import grounding_items, pseudo_label
    answers = {"a red star above a blue circle": [[[1, 1, 10, 10], [2, 2, 9, 9]], []],
               "a heart on sand": [[], []]}
    grounder = _FixedGrounder(answers)
    out = tmp_path / "pseudo" / "pseudo.jsonl"
    out.parent.mkdir()
    counts = pseudo_label(grounder, _grounding_file(tmp_path), out, threshold=0.85, progress=False)
    assert counts == {"captions": 2, "kept": 1, "boxes": 1}  # 0.9 kept, 0.8 not; the heart caption has none
    record = json.loads(out.read_text())
    assert record["image"] == "../a.png" and record["caption"] == "a red star above a blue circle"
    assert record["phrases"][0]["boxes"] == [[1.0, 1.0, 10.0, 10.0]] and record["phrases"][1]["boxes"] == []
    assert grounding_items(out) == []  # an unboxed phrase: not gold
    item = grounding_items(out, allow_unboxed=True)[0]
    assert item.boxes == [[1.0, 1.0, 10.0, 10.0]] and item.spans == [[(2, 10)]]
    skipped = pseudo_label(grounder, _grounding_file(tmp_path), out, threshold=0.85, skip_boxed=True, progress=False)
    assert skipped["captions"] == 1  # only the caption with an unboxed phrase


def test_prompt_tuning_trains_only_a_zero_table_added_to_the_tokens(glip, tmp_path):
    tuned = GLIPDetector.from_checkpoint(glip.save(tmp_path / "g.safetensors"))
    text = tuned.tokenize(["heart. red star"])
    levels = tuned.embed_image(torch.randn(1, 3, 64, 64))
    before = tuned.head(levels, text)["logits"]
    tuned.tune_prompts()
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt_table"]
    assert torch.equal(tuned.head(levels, text)["logits"], before)  # zero at the start
    with torch.no_grad():
        tuned.prompt_table[2] = torch.randn(tuned.text.width)
    assert not torch.allclose(tuned.head(levels, text)["logits"], before)
    reloaded = GLIPDetector.from_checkpoint(tuned.save(tmp_path / "tuned.safetensors"))
    assert torch.equal(reloaded.prompt_table, tuned.prompt_table)


def test_mdetr_annotations_become_grounding_records(tmp_path):
    from ovdense.data.grounding import mdetr_to_jsonl
    from ovdense.engine.glip_train import grounding_items
    caption = "A man in a red shirt holds a kite."
    mdetr = {"images": [{"id": 7, "file_name": "1000.jpg", "caption": caption, "height": 50, "width": 80}],
             "annotations": [{"image_id": 7, "bbox": [1, 2, 10, 20], "tokens_positive": [[0, 5]]},
                             {"image_id": 7, "bbox": [30, 5, 5, 5], "tokens_positive": [[27, 33]]},
                             {"image_id": 7, "bbox": [40, 5, 5, 5], "tokens_positive": [[27, 33]]},
                             {"image_id": 7, "bbox": [3, 3, 4, 4], "tokens_positive": [[11, 14], [15, 20]]}]}
    (tmp_path / "mdetr.json").write_text(json.dumps(mdetr))
    out = tmp_path / "out" / "flickr.jsonl"
    out.parent.mkdir()
    assert mdetr_to_jsonl(tmp_path / "mdetr.json", tmp_path / "images", out) == 1
    record = json.loads(out.read_text())
    assert record["image"] == "../images/1000.jpg" and record["caption"] == caption
    assert [(p["text"], p["boxes"]) for p in record["phrases"]] == [
        ("A man", [[1, 2, 11, 22]]), ("a kite", [[30, 5, 35, 10], [40, 5, 45, 10]]), ("red shirt", [[3, 3, 7, 7]])]
    item = grounding_items(out)[0]
    assert item.spans[-1] == [(11, 14), (15, 20)]  # a phrase in two pieces keeps both


def test_a_vit_clip_gives_a_three_stride_pyramid(tiny_vit):
    torch.manual_seed(0)
    model = GLIPDetector(tiny_vit, **{**TINY, "fusion": False}).eval()
    levels = model.embed_image(torch.randn(1, 3, 96, 128))
    assert [tuple(m.shape[-2:]) for m in levels] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    out = model.head(levels, model.tokenize(["red. blue"]))
    assert out["logits"].shape == (1, 12 * 16 + 6 * 8 + 3 * 4 + 4 + 1, 5) and not model.fusion_layers


def test_a_broken_grounding_file_is_named_with_its_line(tmp_path):
    from ovdense.data.grounding import read_records
    good = {"image": "a.png", "caption": "a red star", "phrases": [{"text": "red star", "span": [2, 10], "boxes": []}]}
    path = tmp_path / "g.jsonl"
    for bad, message in ((dict(good, phrases=[{"text": "red star", "span": [1, 9]}]), "is not .red star."),
                         (dict(good, phrases=[{"text": "red star", "span": [2, 40]}]), "outside the caption"),
                         ({"caption": "x"}, "image")):
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=rf"g.jsonl:2: .*{message}"):
            read_records(path)
    with pytest.raises(InputError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")


def test_pseudo_labels_keep_every_piece_of_a_phrase(tmp_path):
    from ovdense.data.grounding import read_records
    from ovdense.engine.glip_train import pseudo_label
    caption = "a red and shiny star"
    record = {"image": "a.png", "caption": caption,
              "phrases": [{"text": "red star", "span": [2, 5], "spans": [[2, 5], [16, 20]], "boxes": []}]}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    pseudo_label(_FixedGrounder({caption: [[[1, 1, 10, 10]]]}), tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                 threshold=0.5, progress=False)
    phrase = read_records(tmp_path / "out.jsonl")[0]["phrases"][0]
    assert phrase["spans"] == [(2, 5), (16, 20)] and phrase["boxes"] == [[1.0, 1.0, 10.0, 10.0]]


def test_timms_imagenet_swin_weights_load_into_glips_swin_as_they_are(monkeypatch):
    """GLIP starts from ImageNet Swin weights (pretrained_image); timm's, under its own names, fill ovdense's Swin
    (which follows GLIP's swint.py) one to one. Offline, timm's random weights stand in for the download."""
    timm = pytest.importorskip("timm")
    from ovdense.methods.glip import SwinPyramid
    create = timm.create_model
    made = {}

    def offline(name, pretrained=False, **kwargs):
        made["model"] = create(name, pretrained=False, **kwargs)
        return made["model"]

    monkeypatch.setattr(timm, "create_model", offline)
    swin = SwinPyramid("swin-t", pretrained=True).swin
    theirs = made["model"].state_dict()
    assert theirs.keys() == swin.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in swin.state_dict().items())
    with pytest.raises(InputError, match="changed swin-t"):
        SwinPyramid("swin-t", pretrained=True, arch={"window": 12})


def test_an_encoded_prompt_is_reused_in_inference_and_recomputed_after_a_weight_change(tiny_rn):
    torch.manual_seed(0)
    model = GLIPDetector(tiny_rn, **TINY).eval()
    calls = []
    original = model.text.forward
    model.text.forward = lambda text: calls.append(1) or original(text)
    text = model.tokenize(["heart. red star."])
    levels = [torch.randn(1, 32, 16 // 2 ** i, 16 // 2 ** i) for i in range(5)]
    with torch.no_grad():
        first = model.head(levels, text)
        again = model.head(levels, model.tokenize(["heart. red star."]))  # the same words, tokenized anew
        assert len(calls) == 1
        assert torch.equal(first["logits"], again["logits"])
        model.head(levels, model.tokenize(["bar."]))
        assert len(calls) == 2
        next(model.text.parameters()).add_(0.5)  # e.g. an optimizer step or load_state_dict: a new text tower
        changed = model.head(levels, text)
    assert len(calls) == 3
    assert not torch.equal(changed["logits"], first["logits"])
    model.head(levels, text)  # gradients on: training never reads the cache
    assert len(calls) == 4
