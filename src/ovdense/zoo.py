"""The model zoo: the checkpoints the five papers' authors released, and how each becomes an ovdense file.

Importable without torch (`ovdense models` and `ovdense convert --help` answer at once). Each `Release` says what
torchvision's weight enums say of a model: where it comes from, how to get it into ovdense, the inference settings
that reproduce the paper (the preset the converted file records) and the figure the paper reports with them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """One official checkpoint family member.

    name: ovdense's name for it. method: the ovdense method. backbone: what it runs on. files: the file names the
    authors publish, in the order `ovdense convert` takes them. source: the page that links them. preset: the
    protocol the converted file records. paper: the headline figure of the paper (or its model zoo) for it.
    """

    name: str
    method: str
    backbone: str
    files: tuple[str, ...]
    source: str
    preset: str
    paper: str

    @property
    def command(self) -> str:
        """The conversion command, with the files as the authors name them."""
        return f"ovdense convert {self.method} {' '.join(self.files)} --output {self.name}.safetensors"


_TCL = "https://github.com/kakaobrain/tcl#evaluation"
_DENSECLIP = "https://github.com/raoyongming/DenseCLIP/tree/master/segmentation#results"
_REGIONCLIP = "https://github.com/microsoft/RegionCLIP/blob/main/docs/MODEL_ZOO.md"
_GLIP = "https://github.com/microsoft/GLIP#model-zoo"

RELEASES: tuple[Release, ...] = (
    Release("tcl-vit-b16", "tcl", "CLIP ViT-B/16 (OpenAI, frozen)", ("tcl.pth",), _TCL, "tcl",
            "mIoU with PAMR VOC21 55.0, Context60 30.4, COCO-Object 31.6 (TCL paper, Table 2)"),
    Release("denseclip-rn50-ade20k", "denseclip", "CLIP RN50", ("denseclip_fpn_res50_512x512_80k.pth",), _DENSECLIP,
            "denseclip-ade-512", "ADE20K mIoU 43.5 (single scale, Semantic FPN, 80k iterations)"),
    Release("denseclip-rn101-ade20k", "denseclip", "CLIP RN101", ("denseclip_fpn_res101_512x512_80k.pth",), _DENSECLIP,
            "denseclip-ade-512", "ADE20K mIoU 45.1 (single scale, Semantic FPN, 80k iterations)"),
    Release("denseclip-vit-b16-ade20k", "denseclip", "CLIP ViT-B/16", ("denseclip_fpn_vit-b_640x640_80k.pth",),
            _DENSECLIP, "denseclip-ade-640", "ADE20K mIoU 50.6 (single scale, Semantic FPN, 80k iterations)"),
    Release("regionclip-rn50-ovcoco", "regionclip", "RegionCLIP RN50 + offline R50-C4 RPN",
            ("regionclip_finetuned-coco_rn50.pth", "rpn_coco_48.pth", "coco_65_cls_emb.pth"), _REGIONCLIP, "ov-coco",
            "OV-COCO box AP50 novel 31.4, base 57.1, all 50.4"),
    Release("regionclip-rn50x4-ovcoco", "regionclip", "RegionCLIP RN50x4 + offline R50-C4 RPN",
            ("regionclip_finetuned-coco_rn50x4.pth", "rpn_coco_48.pth", "coco_65_cls_emb_rn50x4.pth"), _REGIONCLIP,
            "ov-coco",
            "OV-COCO box AP50 novel 39.3, base 61.6, all 55.7"),
    Release("regionclip-rn50-lvis", "regionclip", "RegionCLIP RN50 + offline R50-FPN RPN (LSJ)",
            ("regionclip_finetuned-lvis_rn50.pth", "rpn_lvis_866_lsj.pth", "lvis_1203_cls_emb.pth"), _REGIONCLIP, "lvis",
            "LVIS v1 box APr 17.1, AP 28.2"),
    Release("regionclip-rn50x4-lvis", "regionclip", "RegionCLIP RN50x4 + offline R50-FPN RPN (LSJ)",
            ("regionclip_finetuned-lvis_rn50x4.pth", "rpn_lvis_866_lsj.pth", "lvis_1203_cls_emb_rn50x4.pth"),
            _REGIONCLIP, "lvis",
            "LVIS v1 box APr 22.0, AP 32.3"),
    Release("regionclip-pretrained-cc-rn50", "regionclip", "CLIP RN50 after region-text pretraining on CC3M",
            ("regionclip_pretrained-cc_rn50.pth",), _REGIONCLIP, "default",
            "the backbone of the OV-COCO / LVIS detectors; zero-shot COCO box AP50 (GT boxes) 65.1"),
    Release("regionclip-pretrained-cc-rn50x4", "regionclip", "CLIP RN50x4 after region-text pretraining on CC3M",
            ("regionclip_pretrained-cc_rn50x4.pth",), _REGIONCLIP, "default",
            "the backbone of the RN50x4 detectors"),
    Release("glip-a-tiny-o365", "glip", "Swin-T + BERT-base, no deep fusion (GLIP-T (A))", ("glip_a_tiny_o365.pth",),
            _GLIP, "glip", "COCO zero-shot box AP 42.9 (fine-tuned 52.9)"),
    Release("glip-tiny-o365", "glip", "Swin-T + BERT-base, deep fusion (GLIP-T (B))", ("glip_tiny_model_o365.pth",),
            _GLIP, "glip", "COCO zero-shot box AP 44.9 (fine-tuned 53.8)"),
    Release("glip-tiny-o365-goldg", "glip", "Swin-T + BERT-base, deep fusion (GLIP-T (C))",
            ("glip_tiny_model_o365_goldg.pth",), _GLIP, "glip", "COCO zero-shot box AP 46.7, LVIS minival APr 14.3"),
    Release("glip-tiny-o365-goldg-cc-sbu", "glip", "Swin-T + BERT-base, deep fusion (GLIP-T)",
            ("glip_tiny_model_o365_goldg_cc_sbu.pth",), _GLIP, "glip", "COCO zero-shot box AP 46.6, LVIS minival APr 17.6"),
    Release("glip-large", "glip", "Swin-L + BERT-base, deep fusion (GLIP-L)", ("glip_large_model.pth",), _GLIP, "glip",
            "COCO zero-shot box AP 51.4 (fine-tuned 61.7), LVIS minival APr 29.3"),
)


def release(name: str) -> Release:
    """The release called `name` (KeyError listing them all otherwise)."""
    for candidate in RELEASES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no release {name!r}; known: {', '.join(r.name for r in RELEASES)}")
