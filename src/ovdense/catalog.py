"""The names of ovdense's interchangeable parts, importable without torch so that `ovdense --help` is instant.

The modules that implement them (backbones/clip.py, methods/, data/datasets.py, text/vocabulary.py) key their
registries by these names; tests/test_cli.py checks that the two agree.
"""
DENSE_MODES = ("plain", "maskclip", "sclip", "clearclip", "naclip")  # ViT; ResNet: RESNET_DENSE_MODES
RESNET_DENSE_MODES = ("plain", "maskclip")
METHODS = ("maskclip", "tcl", "denseclip")
TRAINED_METHODS = ("tcl", "denseclip")
DETECTION_METHODS = ("regionclip", "glip")
DETECTION_PRESETS = ("ov-coco", "lvis", "synthetic-detection", "glip", "glip-lvis", "glip-synthetic")
NMS_KINDS = ("class", "soft", "none")
CHUNKERS = ("auto", "nltk", "rules")  # noun-phrase chunkers for `ovdense ground`  # class-wise NMS, class-wise Gaussian soft-NMS, none
DETECTION_PROTOCOLS = ("coco", "ov-coco", "lvis")  # the metrics `ovdense eval` computes
DATASETS = ("voc21", "voc20", "context60", "context59", "coco_stuff171", "coco_object", "ade150", "cityscapes",
            "folder")
TEMPLATE_SETS = ("imagenet80", "single", "regionclip81", "tcl", "none")
