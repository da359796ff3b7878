"""`ovdense demo`, the offline main job: the best shipped segmenter, detector and grounder on one val scene of the
synthetic world, each verdict printed against the scene's exact ground truth (the checks are `ovdense.demo`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..shipped import ShippedModel, of_kind, shipped
from .build import (
    RANDOM_NOTE,
    build_detection_predictor,
    build_predictor,
    check_model_options,
    describe,
    detector_args,
    shipped_clip_note,
    use_shipped_method,
)
from .inputs import vocabulary
from .options import add_model_options, add_output_folder, command_parser


def add_parser(sub):
    parser = command_parser(sub, "demo", "segment a synthetic-world scene end to end; runs offline")
    add_model_options(parser)
    parser.add_argument("--classes", help="free-text classes (default: the synthetic world's 20 class names)")
    parser.add_argument("--scene", type=int, default=0, help="index of the val scene to segment")
    parser.add_argument("--zoom", type=int, default=4, help="the 96 px scene is shown this many times larger")
    add_output_folder(parser, "demo", "the pictures and JSON")
    return parser


def why(chosen: ShippedModel) -> str:
    """One line saying how the shipped segmenter `chosen` compares with the others."""
    others = "; ".join(f"{m.title} {m.scores()}" for m in of_kind("segmenter") if m is not chosen)
    return f"on 200 val scenes {chosen.scores()}, against {others} (measured by {chosen.measured_by})"


def run(args) -> int:
    from .. import demo
    from ..data.synthetic import SyntheticWorld
    from ..io import prepare_output_dir
    from ..text import Vocabulary
    if args.scene < 0 or args.zoom < 1:
        raise UsageError("--scene must be >= 0 and --zoom >= 1")
    check_model_options(args)
    chosen = use_shipped_method(args)
    out_dir = prepare_output_dir(args.output)
    world = SyntheticWorld()  # the world the shipped models were trained on
    predictor = build_predictor(args)
    backbone = predictor.backbone
    print(f"ovdense demo: model {backbone.name}, weights {backbone.weights}, method {predictor.method.name}, "
          f"preset {predictor.protocol.name}")
    if chosen:
        best = chosen is shipped("segmenter")
        print(f"method: {chosen.title}, {'the best that ships' if best else 'as asked'}: {why(chosen)}")
    clip = shipped("clip", backbone.name, backbone.weights)
    print(RANDOM_NOTE if backbone.weights.startswith("random") else shipped_clip_note(clip) if clip else "")
    words = vocabulary(args) if args.classes else Vocabulary.coerce(world.classes)
    check = demo.run_demo(predictor, world, args.scene, words, out_dir, args.zoom, metadata=describe(predictor))
    _print_segmentation(check, args.scene, words, world, out_dir)
    if chosen:
        _detection(args, world, out_dir)
        _grounding(args, world, out_dir)
    return 0


def _print_segmentation(check: dict, scene: int, words, world, out_dir: Path) -> None:
    """The demo's first part: each thing's verdict."""
    print(f"val scene {scene}; its captions: " + " | ".join(check["captions"]))
    unknown = check["unknown_classes"]
    print(f"classes: {', '.join(words.names)} (novel things, never in any mask or box of the training data: "
          f"{', '.join(world.novel)})" + (f"; not in the world, so counted wrong: {', '.join(unknown)}" if unknown else ""))
    print("each thing, and the label most of its pixels got:")
    for thing in check["things"]:
        mark = "right" if thing["correct"] else "WRONG"
        print(f"  {thing['name']:<18}{' (novel)' if thing['novel'] else '':<9}-> {thing['predicted']:<12} "
              f"{100 * thing['share']:3.0f}% of its pixels  {mark}")
    right = sum(t["correct"] for t in check["things"])
    print(f"against the exact ground truth: pixel accuracy {check['pixel_accuracy']:.1f}%, "
          f"things right {right} of {len(check['things'])}")
    print(f"wrote {out_dir}/demo_scene_overlay.png (prediction), demo_scene_truth.png (ground truth), "
          "demo_scene_labels.png, demo_scene.json")


def _detection(args, world, out_dir: Path) -> None:
    """The demo's second part: the shipped RegionCLIP detector on the same scene, checked against the exact boxes."""
    from .. import demo
    from ..text import Vocabulary
    from ..visualize import score_text
    if not shipped("detector", "regionclip").path.is_file():
        return
    # a picture for people: hard class-wise NMS instead of the evaluation's soft-NMS
    predictor, described = build_detection_predictor(detector_args(args, "regionclip", nms="class"))
    words = vocabulary(args) if args.classes else Vocabulary.coerce(list(world.things))
    check = demo.run_detection_demo(predictor, world, args.scene, words, out_dir, args.zoom, described)
    print(f"\ndetection: regionclip (shipped checkpoint, model {predictor.detector.clip.name}), classes "
          f"{', '.join(words.names)}; each thing, and its best box scoring above {check['min_score']} "
          "with IoU >= 0.5 against its exact box:")
    for thing in check["things"]:
        found = thing["detection"]
        shown = (f"{found['label']:<12} score {score_text(found['score'])}, IoU {found['iou']:.2f}  "
                 f"{'right' if found['correct'] else 'WRONG'}") if found else "no box            MISSED"
        novel = " (novel)" if thing["category"] in world.novel else ""
        print(f"  {thing['name']:<18}{novel:<9}-> {shown}")
    right = sum(bool(t["detection"] and t["detection"]["correct"]) for t in check["things"])
    print(f"things found and named right {right} of {len(check['things'])}; boxes matching no thing: "
          f"{check['unmatched_detections']}")
    print(f"wrote {out_dir}/demo_scene_detection_boxes.png, demo_scene_detection.json")


def _grounding(args, world, out_dir: Path) -> None:
    """The demo's third part: the shipped GLIP grounds the phrases of one of the scene's captions, each checked
    against its exact box."""
    from .. import demo
    from ..visualize import score_text
    if not shipped("detector", "glip").path.is_file():
        return
    predictor, described = build_detection_predictor(detector_args(args, "glip"))
    check = demo.run_grounding_demo(predictor, world, args.scene, out_dir, args.zoom, described)
    print(f"\ngrounding: glip (shipped checkpoint, model {predictor.detector.backbone.name}), caption "
          f"{check['caption']!r}; each phrase, and its best box against its exact box:")
    for phrase in check["phrases"]:
        found = phrase["found"]
        shown = (f"score {score_text(found['score'])}, IoU {found['iou']:.2f}  "
                 f"{'right' if found['correct'] else 'WRONG'}"
                 if found else "no box  MISSED")
        novel = " (novel)" if phrase["category"] in world.novel else ""
        print(f"  {phrase['phrase']:<22}{novel:<9}-> {shown}")
    right = sum(bool(p["found"] and p["found"]["correct"]) for p in check["phrases"])
    print(f"phrases grounded right {right} of {len(check['phrases'])}")
    print(f"wrote {out_dir}/demo_scene_grounding_boxes.png, demo_scene_grounding.json")
