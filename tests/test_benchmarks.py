"""The benchmarks measure what they say: bench_speed counts what torch's FLOP counter does not know as the work it
stands for, and bench_claims' per-scene statistics equal the evaluators (and bench_regionclip_synthetic's region
recognition) on all scenes; the dense diagnostic scores crops and scenes as the training runs do."""
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.flop_counter
from torchvision.ops import deform_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_speed  # noqa: E402


def test_a_deformable_convolution_counts_as_its_dense_equivalent():
    x, weight = torch.randn(2, 8, 10, 12), torch.randn(6, 8, 3, 3)
    offset, mask = torch.zeros(2, 18, 5, 6), torch.ones(2, 9, 5, 6)
    deformable = bench_speed.gflop(lambda: deform_conv2d(x, offset, weight, stride=2, padding=1, mask=mask))
    dense = bench_speed.gflop(lambda: torch.nn.functional.conv2d(x, weight, stride=2, padding=1))
    assert deformable == dense > 0


def test_fused_attention_counts_as_the_unfused_layer():
    layer = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        fused = bench_speed.gflop(lambda: layer(x, x, x, need_weights=False))
        with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
            layer(x, x, x, need_weights=False)
        assert plain.get_total_flops() / 1e9 < fused  # the fast path is one op the counter alone misses
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = bench_speed.gflop(lambda: layer(x, x, x, need_weights=False))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert fused == unfused > 0


def test_the_claims_statistics_equal_the_evaluators_on_all_scenes(tmp_path):
    import bench_claims
    from ovdense.backbones import load_clip
    from ovdense.data.detection import DetectionDataset
    from ovdense.data.export import export_world
    from ovdense.data.synthetic import SyntheticWorld
    from ovdense.detection.predictor import DetectionPredictor, GroundingPredictor
    from ovdense.eval import SegmentationMetric, group_means
    from ovdense.eval.detection import evaluate_detection
    from ovdense.eval.grounding import evaluate_grounding
    from ovdense.methods import MaskCLIP, load_detector
    from ovdense.predictor import SegmentationPredictor
    from ovdense.presets import get_detection_protocol

    scenes = 6
    world = SyntheticWorld()
    data = export_world(world, tmp_path / "world", {"train": 1, "val": scenes}, progress=False)
    score = bench_claims.Scorer(data, scenes)
    everything = list(range(scenes))

    method = MaskCLIP(load_clip("ovdense-tiny-vit", "synthetic"), "naclip")
    metric = SegmentationMetric(len(world.classes))
    predictor = SegmentationPredictor(method, "synthetic")
    for i in everything:
        scene = world.scene(bench_claims.scene_index("val", i))
        metric.update(predictor(scene.image, world.classes).labels, scene.semantic)
    expected = group_means(metric.compute()["IoU"], list(world.classes), {"stuff": list(world.stuff)})["stuff"]
    stuff = [world.classes.index(s) for s in world.stuff]
    assert score.iou(method, stuff, "naclip")(everything) == pytest.approx(expected, abs=1e-6)

    dataset = DetectionDataset(data / "instances_val.json")
    detector = DetectionPredictor(load_detector("regionclip", weights="synthetic")[0],
                                  get_detection_protocol("synthetic-detection"))
    expected = evaluate_detection(detector, dataset, "ov-coco", progress=False)["AP50_novel"]
    assert score.novel_ap50(detector)(everything) == pytest.approx(expected, abs=1e-6)

    import bench_regionclip_synthetic
    teacher = load_clip("ovdense-tiny-rn", "synthetic")
    expected = bench_regionclip_synthetic.region_recognition(teacher, dataset, 192, 7)["novel"]
    assert score.region_hits(teacher)(everything) == pytest.approx(expected, abs=1e-6)

    grounder = GroundingPredictor(load_detector("glip", weights="synthetic")[0], get_detection_protocol("glip-synthetic"))
    expected = evaluate_grounding(grounder, data / "grounding_val.jsonl", progress=False)["R@1_novel"]
    assert score.novel_recall(grounder)(everything) == pytest.approx(expected, abs=1e-6)


def test_the_dense_diagnostic_scores_crops_and_scenes_as_the_training_runs_do():
    import diagnose_dense_things
    from ovdense.backbones import load_clip
    from ovdense.data.synthetic import SyntheticWorld
    from ovdense.engine.clip_pretrain import zero_shot_crops, zero_shot_regions

    backbone, world = load_clip("ovdense-tiny-vit", "synthetic"), SyntheticWorld(96, seed=0)
    report = diagnose_dense_things.diagnose(backbone, world, scenes=12)
    crops, regions = zero_shot_crops(backbone, world, 12), zero_shot_regions(backbone, world, 12)
    for group in ("base", "novel"):  # abs: the training runs average in float32
        assert report[group]["crop"] == pytest.approx(crops[f"zs_{group}_acc"], abs=1e-4)
        assert report[group]["scene dense"] == pytest.approx(regions[f"dense_{group}_acc"], abs=1e-4)
        assert 0 < report[group]["on thing"] < 100
        assert sum(count for _, count in report[group]["scene answers"]) <= report[group]["things"]
    assert report["base"]["things"] + report["novel"]["things"] == crops["zs_crops"]


def test_the_training_free_claims_need_no_trained_runs(tmp_path, monkeypatch, capsys):
    import bench_claims
    from ovdense.data.export import export_world
    from ovdense.data.synthetic import SyntheticWorld

    data = export_world(SyntheticWorld(), tmp_path / "world", {"train": 1, "val": 2}, progress=False)
    argv = ["bench_claims.py", "--runs", str(tmp_path / "none"), "--data", str(data), "--scenes", "2", "--draws", "20"]
    monkeypatch.setattr(sys, "argv", argv + ["--only", "maskclip"])
    bench_claims.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| MaskCLIP family")]
    assert [row.split("|")[3].strip() for row in rows[-4:]] == ["maskclip", "sclip", "clearclip", "naclip"]
    monkeypatch.setattr(sys, "argv", argv + ["--only", "maskclip", "tcl"])
    with pytest.raises(SystemExit):  # TCL is trained: its seeds' runs are needed
        bench_claims.main()
    assert "has no seed*/ folders" in capsys.readouterr().err
    assert torch.is_grad_enabled()  # main's no_grad ends with it
