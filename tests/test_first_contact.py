"""What a new user meets first: one rule for the model flags, usage errors before torch loads, -q anywhere, the
shipped models by name, and an ONNX export that labels a scene as `segment` does."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ovdense.cli import main
from ovdense.data.export import scene_index
from ovdense.data.synthetic import SyntheticWorld


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(np.asarray(SyntheticWorld().scene(scene_index("val", 0)).image)).save(path)
    return path


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_a_missing_vocabulary_is_reported_before_torch_loads(tmp_path):
    script = ("import sys; from ovdense.cli import main; code = main(['segment', 'x.png']); "
              "sys.exit(10 * code + ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 20, done.stderr  # usage error (2), torch never imported (0)
    assert "--classes" in done.stderr


@pytest.mark.parametrize("flags, expected", [
    ([], ("ovdense-tiny-vit", "synthetic", "maskclip")),
    (["--weights", "synthetic"], ("ovdense-tiny-vit", "synthetic", "maskclip")),
    (["--model", "ovdense-tiny-vit"], ("ovdense-tiny-vit", "synthetic", "maskclip")),
    (["--model", "ovdense-tiny-rn"], ("ovdense-tiny-rn", "synthetic", "maskclip")),
    (["--method", "denseclip", "--weights", "synthetic"], ("ovdense-tiny-vit", "synthetic", "denseclip")),
    (["--method", "tcl"], ("ovdense-tiny-vit", "synthetic", "tcl")),
])
def test_one_flag_implies_the_other_and_shipped_methods_work_by_name(flags, expected, scene_png, tmp_path, capsys):
    out = tmp_path / "out"
    code, captured = _run(["segment", str(scene_png), "--classes", "sky, sand, grass", "--output", str(out), "-q",
                           *flags], capsys)
    assert code == 0, captured.err
    described = json.loads((out / "scene.json").read_text())
    assert (described["model"], described["weights"], described["method"]) == expected
    assert {s["label"] for s in described["segments"]} <= {"sky", "sand", "grass"}


def test_real_weights_alone_imply_a_real_architecture(scene_png, tmp_path, capsys, monkeypatch):
    import ovdense.predictor as predictor_module
    seen = {}

    def fake_build(model, weights, *args, **kwargs):
        seen.update(model=model, weights=weights)
        raise SystemExit(0)
    monkeypatch.setattr(predictor_module, "build_predictor", fake_build)
    with pytest.raises(SystemExit):
        main(["segment", str(scene_png), "--classes", "cat", "--output", str(tmp_path), "--weights", "openai"])
    assert seen == {"model": "ViT-B-16", "weights": "openai"}
    with pytest.raises(SystemExit):
        main(["segment", str(scene_png), "--classes", "cat", "--output", str(tmp_path), "--model", "RN50"])
    assert seen == {"model": "RN50", "weights": "openai"}


def test_quiet_and_verbose_are_accepted_after_the_command(scene_png, tmp_path, capsys):
    code, captured = _run(["segment", str(scene_png), "--classes", "sky", "--output", str(tmp_path), "-q"], capsys)
    assert code == 0 and captured.err == ""
    assert "--quiet" in subprocess.run([sys.executable, "-m", "ovdense.cli", "segment", "--help"],
                                       capture_output=True, text=True).stdout


def test_the_model_rule_is_in_the_help():
    for command in ("segment", "eval", "export", "demo", "serve"):
        shown = " ".join(subprocess.run([sys.executable, "-m", "ovdense.cli", command, "--help"],
                                        capture_output=True, text=True).stdout.split())
        assert "ships with ovdense (ovdense-tiny-vit" in shown or command == "export", command


def test_onnx_export_labels_a_scene_as_segment_does(scene_png, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from ovdense.onnx_runtime import OnnxSegmenter
    classes = "sky, grass, water, sand, snow, brick wall, wooden floor, asphalt"
    code, captured = _run(["export", "--classes", classes, "--output", str(tmp_path / "onnx"), "-q"], capsys)
    assert code == 0, captured.err
    config = json.loads((tmp_path / "onnx" / "ovdense_onnx.json").read_text())
    assert config["templates"] == ["{}"] and config["short_side"] == 96 and config["logit_scale"] == 40.0
    code, captured = _run(["segment", str(scene_png), "--classes", classes, "--output", str(tmp_path / "seg"),
                           "--pamr", "0", "-q"], capsys)
    assert code == 0, captured.err
    expected = np.asarray(Image.open(tmp_path / "seg" / "scene_labels.png"))
    segmenter = OnnxSegmenter(tmp_path / "onnx")
    for image in (scene_png, str(scene_png), Image.open(scene_png), np.asarray(Image.open(scene_png).convert("RGB"))):
        labels, _ = segmenter(image)
        assert (labels == expected).mean() > 0.98


def test_eval_names_the_option_whose_path_is_wrong(tmp_path, capsys):
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (tmp_path / "results").mkdir()
    code, captured = _run(["eval", "--annotations", str(annotations), "--method", "glip", "--weights", "synthetic",
                           "--results", str(tmp_path / "results")], capsys)
    assert code == 1 and "--results" in captured.err and "--output" not in captured.err


def test_ground_records_the_threshold_it_applied(scene_png, tmp_path, capsys):
    code, captured = _run(["ground", str(scene_png), "--caption", "sand with a black hourglass", "--weights",
                           "synthetic", "--threshold", "0.3", "--output", str(tmp_path), "-q"], capsys)
    assert code == 0, captured.err
    written = json.loads((tmp_path / "scene.json").read_text())
    assert written["threshold"] == 0.3
    assert all(box["score"] > 0.3 for phrase in written["phrases"] for box in phrase["boxes"])


@pytest.mark.parametrize("offline", [True, False])
def test_missing_weights_fail_at_once_in_one_line(offline, tmp_path, monkeypatch, capsys):
    import open_clip

    from ovdense.backbones import loading
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(loading.huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online, but the hub cannot be reached: one probe, then the error
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(loading, "_host_reachable", lambda host, timeout=3.0: False)

    def downloader(*args, **kwargs):
        raise AssertionError("open_clip's downloader (and its retries) ran")
    monkeypatch.setattr(open_clip, "create_model", downloader)
    with pytest.raises(loading.WeightsNotFoundError) as error:
        loading.load_clip("ViT-B-16", "openai")
    assert "ViT-B-16/openai" in str(error.value) and "\n" not in str(error.value)
    assert "ships with ovdense needs no download" in str(error.value)
    code, captured = _run(["segment", "x.png", "--classes", "cat", "--weights", "openai", "--output",
                           str(tmp_path / "out")], capsys)
    assert code == 1 and len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: CLIP weights")


def test_names_the_shipped_clip_never_read_get_a_warning(scene_png, tmp_path, capsys):
    code, captured = _run(["segment", str(scene_png), "--classes", "cat, sky, brick wall, red star", "--output",
                           str(tmp_path)], capsys)
    assert code == 0
    warnings = [line for line in captured.err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "'cat'" in warnings[0] and "--weights openai" in warnings[0]
    assert "sky" not in warnings[0] and "brick wall" not in warnings[0] and "red star" not in warnings[0]


@pytest.fixture(scope="module")
def shipped_glip():
    from ovdense.detection.predictor import GroundingPredictor
    from ovdense.methods import load_detector
    detector, preset = load_detector("glip", weights="synthetic")
    return GroundingPredictor(detector, preset)


def test_spans_index_the_caption_as_given(shipped_glip):
    from ovdense.detection.grounding import caption_prompt
    caption = "İİİ a Red Star on sand"  # 'İ'.lower() is two characters
    prompt = caption_prompt(caption, ["red star", "SAND"])
    assert [caption[s:e] for spans in prompt.spans for s, e in spans] == ["Red Star", "sand"]
    ids, spans = shipped_glip.detector.text.token_spans(caption)
    assert {caption[s:e] for s, e in spans} >= {"Red", "Star", "sand"}


def test_top_k_counts_per_image_over_all_prompts(shipped_glip):
    from ovdense.data.datasets import builtin_vocabulary
    from ovdense.data.synthetic import THINGS
    scene = np.asarray(SyntheticWorld().scene(scene_index("val", 0)).image)
    names = list(THINGS) + builtin_vocabulary("lvis1203").names[:100]
    shipped_glip.set_image(scene)
    assert len(shipped_glip.detect(names, max_detections=5, score_threshold=0.0)) == 5
    per_prompt = shipped_glip.detect(names, max_detections=5, score_threshold=0.0, per_prompt=True)
    assert len(per_prompt) > 5  # GLIP's LVIS evaluation: 5 for each of the prompts


def test_prompts_fill_the_text_encoders_real_budget(shipped_glip):
    from ovdense.data.datasets import builtin_vocabulary
    from ovdense.detection.grounding import chunk_classes, class_prompt
    detector = shipped_glip.detector
    names = builtin_vocabulary("lvis1203").names[:200]
    chunks = chunk_classes(names, detector.count_tokens, detector.max_tokens, chunk_size=80)
    for chunk, following in zip(chunks, chunks[1:]):
        used = detector.count_tokens(class_prompt([names[k] for k in chunk]).caption) + 2
        longer = detector.count_tokens(class_prompt([names[k] for k in chunk + following[:1]]).caption) + 2
        assert used <= detector.max_tokens < longer  # full: one more name would not fit
    assert len(detector.text.tokenize([class_prompt([names[k] for k in chunks[0]]).caption]).ids[0]) \
        <= detector.max_tokens


def test_convert_checks_its_options_and_hands_the_files_to_the_repositorys_converter(tmp_path, capsys, monkeypatch):
    import ovdense.convert.regionclip as regionclip
    released = tmp_path / "regionclip_finetuned-coco_rn50.pth"
    released.write_bytes(b"x")
    out = tmp_path / "out.safetensors"
    code, captured = _run(["convert", "tcl", str(tmp_path / "missing.pth"), "--output", str(out)], capsys)
    assert code == 1 and "missing.pth does not exist" in captured.err and "ovdense models" in captured.err
    code, captured = _run(["convert", "tcl", str(released), "--output", str(tmp_path / "out.pt")], capsys)
    assert code == 2 and ".safetensors" in captured.err
    code, captured = _run(["convert", "tcl", str(released), "--output", str(out), "--ema"], capsys)
    assert code == 2 and "--ema does not apply to `convert tcl`" in captured.err
    seen = {}

    def fake(paths, output, **options):  # stands for the converter: writes CLIP weights, not a method file
        seen.update(paths=paths, output=output, options=options)
        from safetensors.torch import save_file
        import torch
        save_file({"w": torch.zeros(1)}, str(output))
        return output
    monkeypatch.setattr(regionclip, "convert", fake)
    code, captured = _run(["convert", "regionclip", str(released), "--output", str(out), "--classes", "ov_coco65",
                           "--text-weights", "openai"], capsys)
    assert code == 0 and seen["paths"] == [str(released)] and seen["output"] == out
    assert seen["options"] == {"class_names": "ov_coco65", "text_weights": "openai"}
    assert "CLIP weights" in captured.out and "--model RN50" in captured.out
    import ovdense.convert.glip as glip
    monkeypatch.setattr(glip, "convert", fake)
    code, captured = _run(["convert", "glip", str(released), "--output", str(out), "--preset", "glip-lvis", "--ema"],
                          capsys)
    assert code == 0 and seen["options"] == {"ema": True, "preset": "glip-lvis"}
    code, captured = _run(["convert", "glip", str(released), "--output", str(out), "--classes", "a"], capsys)
    assert code == 2 and "--classes does not apply to `convert glip`" in captured.err
