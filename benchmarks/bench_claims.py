"""Each paper's claim on the synthetic world, rerun: every trained system for each of the training seeds found,
scored on the same val scenes, with 95% percentile-bootstrap intervals over the scenes (a system's value is the mean
over its seeds; a claim's gap is recomputed on each resample, so its interval is the paired one). A claim holds
when the whole interval of its gap lies above 0.

Train the systems of one seed (about 2.5 h on a 2-core CPU) with

    sh benchmarks/train_claims.sh SEED [RUNS]          # RUNS defaults to runs/claims; VIT=FILE RN=FILE choose CLIPs

then print the table (the val data is the one the recipes export, data/synthetic-96):

    python benchmarks/bench_claims.py --runs runs/claims --scenes 200

Claims (measure on the val split; "novel": things no box or mask of training showed):
  MaskCLIP family: each training-free dense mode against the plain readout, novel things IoU.
  TCL: TCL against MaskCLIP, novel things IoU.
  DenseCLIP: language-guided against the same FPN without language, mIoU over all classes.
  RegionCLIP: the pretrained student against its CLIP teacher, novel region recognition on exact boxes; the detector
    initialised from the student against one initialised from CLIP, novel AP50.
  GLIP: deep fusion against no fusion, novel AP50 and novel R@1; the student (gold + the fusion model's pseudo
    labels) against its teacher, novel AP50.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ovdense.backbones import load_clip
from ovdense.data.detection import DetectionDataset
from ovdense.data.export import scene_index
from ovdense.data.synthetic import SyntheticWorld
from ovdense.detection.predictor import DetectionPredictor, GroundingPredictor
from ovdense.eval import SegmentationMetric
from ovdense.eval.bootstrap import ap50_statistic, bootstrap, difference, iou_statistic, mean_over, rate_statistic
from ovdense.eval.detection import evaluate_detection, pipe_table, scored_categories
from ovdense.eval.grounding import grounding_hits, read_grounding
from ovdense.methods import MaskCLIP, load_detector, load_method
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import get_detection_protocol
from ovdense.text import Vocabulary

from bench_regionclip_synthetic import region_predictions  # the benchmarks' folder is on sys.path

# run folder (under RUNS/seedS) -> its exported file, as benchmarks/train_claims.sh writes them
RUNS = {"tcl": "tcl.safetensors", "denseclip": "denseclip.safetensors", "denseclip-baseline": "denseclip.safetensors",
        "regionclip-pretrain": "regionclip-pretrain.safetensors", "regionclip": "regionclip.safetensors",
        "regionclip-clipinit": "regionclip.safetensors", "glip": "glip.safetensors", "glip-a": "glip.safetensors",
        "glip-student": "glip.safetensors"}
TRAINING_FREE = ("plain", "maskclip", "sclip", "clearclip", "naclip")


def scene_of(image: str) -> int:
    """'.../images/val_000012.png' -> 12, the val scene an exported image shows."""
    return int(Path(image).stem.rsplit("_", 1)[1])


class Scorer:
    """Per-scene scores of systems on the first `scenes` val scenes, each turned into a bootstrap statistic."""

    def __init__(self, data: Path, scenes: int):
        self.world, self.scenes = SyntheticWorld(), scenes  # the 96 px world the synthetic recipes export
        self.classes = list(self.world.classes)
        self.novel_classes = [self.classes.index(n) for n in self.world.novel]
        self.detection = DetectionDataset(data / "instances_val.json")
        self.grounding = data / "grounding_val.jsonl"
        ids, _ = scored_categories(self.detection, "ov-coco")
        self.novel_ids = [c for c in ids if self.detection.category_split[c] == "novel"]
        coco = self.detection.coco.dataset
        kept = {image["id"] for image in coco["images"] if image["id"] <= scenes}
        self.coco = {"images": [i for i in coco["images"] if i["id"] in kept], "categories": coco["categories"],
                     "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}

    @torch.no_grad()
    def iou(self, method, classes: list[int], desc: str):
        """The mean IoU over `classes` of a dense method (preset `synthetic`: 96 px, one window, PAMR)."""
        predictor = SegmentationPredictor(method.eval(), "synthetic")
        vocabulary = Vocabulary.coerce(self.world.classes)
        inter, union = np.zeros((self.scenes, len(self.classes))), np.zeros((self.scenes, len(self.classes)))
        for i in tqdm(range(self.scenes), desc=desc, leave=False):
            scene = self.world.scene(scene_index("val", i))
            metric = SegmentationMetric(len(self.classes))
            metric.update(predictor(scene.image, vocabulary).labels, scene.semantic)
            confusion = metric.confusion.double().numpy()
            inter[i] = np.diag(confusion)
            union[i] = confusion.sum(0) + confusion.sum(1) - inter[i]
        return iou_statistic(inter, union, classes)

    def region_hits(self, clip):
        """Per scene, whether each novel thing's exact box is named right among the 12 thing names (the RegionCLIP
        recipes' region encoder: res4, RoIAlign 7x7, res5 and the attention pool, at 192 px)."""
        predictions = region_predictions(clip, self.detection, short=192, resolution=7, limit=self.scenes)
        return rate_statistic([[right for split, right in predictions.get(i + 1, []) if split == "novel"]
                               for i in range(self.scenes)])

    def novel_ap50(self, predictor):
        """COCO AP50 over the novel things of a detector's predictor."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "results.json"
            evaluate_detection(predictor, self.detection, "ov-coco", limit=self.scenes, progress=False,
                               results_path=path)
            results = json.loads(path.read_text())
        return ap50_statistic(self.coco, results, self.novel_ids)

    def novel_recall(self, predictor):
        """R@1 of the novel-thing phrases of the val grounding captions."""
        records, groups = read_grounding(self.grounding)
        records = [r for r in records if scene_of(r["image"]) < self.scenes]
        hits = [[] for _ in range(self.scenes)]
        for index, group, phrase in grounding_hits(predictor, records, groups, progress=False):
            if group == "novel":
                hits[scene_of(records[index]["image"])].append(phrase[0])  # R@1
        return rate_statistic(hits)


@torch.no_grad()  # restored on return: the tests call main()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/claims", help="the folder with seed0/, seed1/, ... (train_claims.sh)")
    parser.add_argument("--data", default="data/synthetic-96", help="the exported synthetic world (val split)")
    parser.add_argument("--vit", default="synthetic", help="the weights of ovdense-tiny-vit (training-free rows)")
    parser.add_argument("--rn", default="synthetic", help="the weights of ovdense-tiny-rn (the RegionCLIP teacher)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--only", nargs="*", help="claims to run (maskclip tcl denseclip regionclip glip)")
    args = parser.parse_args()
    only = set(args.only or ["maskclip", "tcl", "denseclip", "regionclip", "glip"])
    seeds = sorted(p for p in Path(args.runs).glob("seed*") if p.is_dir())
    if not seeds and only - {"maskclip"}:  # the MaskCLIP family is training-free
        parser.error(f"{args.runs} has no seed*/ folders: train them with benchmarks/train_claims.sh")
    score = Scorer(Path(args.data), args.scenes)

    def runs(name):
        paths = [seed / name / RUNS[name] for seed in seeds]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SystemExit(f"missing {', '.join(missing)}: train it with benchmarks/train_claims.sh")
        return paths

    def seeded(name, statistic_of):
        return mean_over([statistic_of(path) for path in runs(name)])

    rows = []

    def claim(name, measure, first, second, a, b):
        estimates = [bootstrap(s, args.scenes, args.draws) for s in (a, b, difference(a, b))]
        rows.append([name, measure, first, second, *map(str, estimates), "yes" if estimates[2].above_zero else "no"])
        print(pipe_table(["claim", "measure", "A", "B", "A", "B", "A - B", "holds"], rows[-1:], "left"), flush=True)

    novel = score.novel_classes
    vit = load_clip("ovdense-tiny-vit", args.vit)
    maskclip = score.iou(MaskCLIP(vit, "maskclip"), novel, "maskclip")
    if "maskclip" in only:
        plain = score.iou(MaskCLIP(vit, "plain"), novel, "plain")
        for mode in TRAINING_FREE[1:]:
            a = maskclip if mode == "maskclip" else score.iou(MaskCLIP(vit, mode), novel, mode)
            claim("MaskCLIP family", "novel things IoU", mode, "plain", a, plain)
    if "tcl" in only:
        tcl = seeded("tcl", lambda p: score.iou(load_method("tcl", checkpoint=str(p)), novel, "tcl"))
        claim("TCL", "novel things IoU", "TCL", "MaskCLIP", tcl, maskclip)
    if "denseclip" in only:
        every = list(range(len(score.classes)))
        dense = {name: seeded(name, lambda p, n=name: score.iou(load_method("denseclip", checkpoint=str(p)), every, n))
                 for name in ("denseclip", "denseclip-baseline")}
        claim("DenseCLIP", "mIoU, all classes", "language-guided", "no language", dense["denseclip"],
              dense["denseclip-baseline"])
    if "regionclip" in only:
        teacher = score.region_hits(load_clip("ovdense-tiny-rn", args.rn))
        student = seeded("regionclip-pretrain", lambda p: score.region_hits(load_clip("ovdense-tiny-rn", str(p))))
        claim("RegionCLIP", "novel regions, exact boxes, top-1", "student", "CLIP teacher", student, teacher)
        protocol = get_detection_protocol("synthetic-detection")
        detectors = {name: seeded(name, lambda p: score.novel_ap50(
            DetectionPredictor(load_detector("regionclip", str(p))[0], protocol)))
            for name in ("regionclip", "regionclip-clipinit")}
        claim("RegionCLIP", "novel AP50", "RegionCLIP init", "CLIP init", detectors["regionclip"],
              detectors["regionclip-clipinit"])
    if "glip" in only:
        protocol = get_detection_protocol("glip-synthetic")
        grounders = {name: [GroundingPredictor(load_detector("glip", str(p))[0], protocol) for p in runs(name)]
                     for name in ("glip", "glip-a", "glip-student")}  # each loaded once for both measures
        ap50 = {name: mean_over([score.novel_ap50(g) for g in grounders[name]]) for name in grounders}
        recall = {name: mean_over([score.novel_recall(g) for g in grounders[name]]) for name in ("glip", "glip-a")}
        claim("GLIP", "novel AP50", "deep fusion", "no fusion", ap50["glip"], ap50["glip-a"])
        claim("GLIP", "novel R@1", "deep fusion", "no fusion", recall["glip"], recall["glip-a"])
        claim("GLIP", "novel AP50", "student", "teacher", ap50["glip-student"], ap50["glip"])
    trained = f"{len(seeds)} seed(s) ({', '.join(s.name for s in seeds)})" if seeds else "training-free only"
    print(f"\n{trained}, {args.scenes} val scenes, {args.draws} resamples; [95% percentile-bootstrap interval over "
          "the scenes]")
    print(pipe_table(["claim", "measure", "A", "B", "A", "B", "A - B", "holds"], rows, "left"))


if __name__ == "__main__":
    main()
