"""A corpus of odd and bad inputs: each either loads correctly or raises the project's error naming the file.

One table-driven test per family: images that load, images and arrays that are refused, datasets, CLIP weights
files, method checkpoints. Payloads that would run code create a marker file; no test may find it.
"""
import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from types import SimpleNamespace
from typing import Tuple

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file

from ovdense.backbones import load_clip
from ovdense.backbones.loading import _torchscript_weights
from ovdense.data import ImageError, SegmentationDataset, load_image
from ovdense.errors import CheckpointError, InputError
from ovdense.eval import evaluate_segmentation
from ovdense.methods import read_trained

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---------------------------------------------------------------- images that load
def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def _halves(size, left, right):
    """An RGB image (W, H) = size, left half `left`, right half `right`."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2], array[:, size[0] // 2:] = left, right
    return Image.fromarray(array)


def _exif_rotated(tmp_path, orientation):
    image = _halves((48, 16), RED, BLUE)
    exif = image.getexif()
    exif[0x0112] = orientation
    return _save(tmp_path / f"rotated{orientation}.jpg", image, exif=exif, quality=95)


def _palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *GREEN])
    image.paste(1, (2, 0, 4, 2))  # right half: opaque green; left half: transparent red
    return _save(tmp_path / "palette.png", image, transparency=0)


def _la(tmp_path):
    array = np.zeros((2, 4, 2), dtype=np.uint8)
    array[..., 0], array[:, :2, 1], array[:, 2:, 1] = 100, 255, 0  # gray 100, opaque left, transparent right
    return _save(tmp_path / "la.png", Image.fromarray(array, "LA"))


def _animated_gif(tmp_path):
    first, second = Image.new("RGB", (4, 2), RED), Image.new("RGB", (4, 2), BLUE)
    return _save(tmp_path / "anim.gif", first, save_all=True, append_images=[second])


def _left_right(height, width, left, right):
    """The expected (H, W, 3) pixels: colour (or gray level) `left` on the left half, `right` on the right."""
    return np.asarray(_halves((width, height), left, right))


def _top_bottom(height, width, top, bottom):
    return _left_right(width, height, top, bottom).transpose(1, 0, 2)


def _plain(height, width, colour):
    return _left_right(height, width, colour, colour)


LOADS = [
    pytest.param(lambda t: _save(t / "f01.tif", Image.fromarray(np.full((2, 4), 0.5, np.float32))),
                 _plain(2, 4, 128), 0, id="float-tiff-within-0-1-times-255"),
    pytest.param(lambda t: _save(t / "f255.tif", Image.fromarray(np.full((2, 4), 100.0, np.float32))),
                 _plain(2, 4, 100), 0, id="float-tiff-within-0-255-as-is"),
    pytest.param(lambda t: _save(t / "deep.png", Image.fromarray(np.full((2, 4), 100 * 257, np.uint16))),
                 _plain(2, 4, 100), 0, id="png-16-bit-over-65535"),
    pytest.param(lambda t: _save(t / "small.tif", Image.fromarray(np.full((2, 4), 100, np.int32))),
                 _plain(2, 4, 100), 0, id="int32-tiff-small-values-as-is"),
    pytest.param(lambda t: _save(t / "mid.tif", Image.fromarray(np.full((2, 4), 100 * 257, np.int32))),
                 _plain(2, 4, 100), 0, id="int32-tiff-16-bit-values-over-65535"),
    pytest.param(lambda t: _save(t / "bits.png", Image.fromarray(np.array([[0, 0, 1, 1]] * 2, bool))),
                 _left_right(2, 4, 0, 255), 0, id="1-bit-png-0-or-255"),
    pytest.param(_palette_with_transparency, _left_right(2, 4, 255, GREEN), 0,
                 id="palette-transparency-on-white"),
    pytest.param(_la, _left_right(2, 4, 100, 255), 0, id="LA-transparency-on-white"),
    pytest.param(lambda t: _save(t / "cmyk.jpg", Image.new("CMYK", (16, 8), (0, 255, 255, 0)), quality=95),
                 _plain(8, 16, RED), 8, id="cmyk-jpeg"),
    pytest.param(lambda t: _exif_rotated(t, 6), _top_bottom(48, 16, RED, BLUE), 40, id="exif-orientation-6-swaps-HW"),
    pytest.param(lambda t: _exif_rotated(t, 8), _top_bottom(48, 16, BLUE, RED), 40, id="exif-orientation-8-swaps-HW"),
    pytest.param(_animated_gif, _plain(2, 4, RED), 0, id="animated-gif-first-frame"),
]


@pytest.mark.parametrize("make, expected, tolerance", LOADS)
def test_image_loads(tmp_path, make, expected, tolerance):
    """Odd but valid files give (H, W, 3) uint8 RGB with the right pixels (JPEGs within a tolerance)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning (e.g. on modes or EXIF) escapes
        rgb = load_image(make(tmp_path))
    assert rgb.dtype == np.uint8 and rgb.shape == expected.shape
    error = np.abs(rgb.astype(int) - expected.astype(int))
    assert np.median(error) <= tolerance / 4 and error.max() <= max(tolerance * 3, 1)


# ---------------------------------------------------------------- images and arrays that are refused
def _png_claiming(path, width, height):
    """A 1x1 PNG whose header (IHDR) claims width x height: a decompression bomb's header, a few bytes long."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at 16, its CRC follows at 29
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _cut(path, image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _noise(size=64):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _unreadable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    path = _save(tmp_path / "locked.png", Image.new("RGB", (2, 2)))
    path.chmod(0)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


REFUSED_IMAGES = [
    pytest.param(lambda t: _png_claiming(t / "bomb.png", 30000, 30000), "megapixels",
                 id="bomb-900MP-header-over-PIL-error-limit"),
    pytest.param(lambda t: _png_claiming(t / "big.png", 10000, 10000), "megapixels",
                 id="100MP-header-over-PIL-warning-limit"),
    pytest.param(lambda t: _cut(t / "cut.jpg", _noise(), "JPEG"), "truncated", id="truncated-jpeg"),
    pytest.param(lambda t: _cut(t / "cut.png", _noise(), "PNG"), "truncated", id="truncated-png"),
    pytest.param(lambda t: Image.open(_cut(t / "lazy.png", _noise(), "PNG")), "truncated",
                 id="lazy-PIL-image-of-truncated-file"),
    pytest.param(lambda t: _write(t / "zero.jpg", b""), "empty", id="zero-byte-file"),
    pytest.param(lambda t: _write(t / "text.jpg", b"not an image\n"), "not an image", id="text-file-named-jpg"),
    pytest.param(lambda t: _mkdir(t / "pictures.png"), "folder", id="directory"),
    pytest.param(lambda t: t / "absent.png", "no such file", id="missing-file"),
    pytest.param(_unreadable, "cannot be read", id="no-read-permission"),
    pytest.param(lambda t: _save(t / "hdr.tif", Image.fromarray(np.full((2, 2), 300.0, np.float32))), "span",
                 id="float-tiff-outside-0-255"),
    pytest.param(lambda t: _save(t / "nan.tif", Image.fromarray(np.full((2, 2), np.nan, np.float32))), "nan",
                 id="float-tiff-nan"),
    pytest.param(lambda t: _save(t / "neg.tif", Image.fromarray(np.full((2, 2), -5, np.int32))), "span",
                 id="int32-tiff-negative"),
]


@pytest.mark.parametrize("make, reason", REFUSED_IMAGES)
def test_image_refused(tmp_path, monkeypatch, make, reason):
    """ImageError naming the file and the reason; over-large files are refused from the header, undecoded."""
    source = make(tmp_path)
    if "megapixels" in reason:  # decoding the pixels would be a failure of its own
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    name = str(getattr(source, "filename", source))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(ImageError) as caught:
            load_image(source)
    message = str(caught.value)
    assert name in message and reason in message.replace(str(tmp_path), "<tmp>")  # the reason, not the path
    getattr(source, "close", lambda: None)()


ARRAYS = [
    pytest.param(np.array([[False, True]]), [0, 255], id="bool-0-or-255"),
    pytest.param(np.array([[0, 200]], np.int32), [0, 200], id="int32-within-0-255-as-is"),
    pytest.param(np.array([[0.0, 1.0]]), [0, 255], id="float64-within-0-1-times-255"),
    pytest.param(np.array([[0, 65535]], np.uint16), [0, 255], id="uint16-over-257"),
    pytest.param(np.array([[0, 300]], np.int32), "span [0, 300]", id="int32-over-255-refused"),
    pytest.param(np.array([[-1.0, 0.5]]), "span [-1, 0.5]", id="float64-negative-refused"),
    pytest.param(np.array([[0.0, 255.0]]), "span [0, 255]", id="float64-0-255-refused"),
    pytest.param(np.array([[np.nan, 0.5]]), "nan", id="float64-nan-refused"),
    pytest.param(np.array([[1j, 0]]), "dtype complex128", id="complex-refused"),
]


@pytest.mark.parametrize("array, expected", ARRAYS)
def test_array_inputs(array, expected):
    """Arrays follow one dtype convention: bool/uint8/uint16 by type, other ints 0..255, floats [0, 1]."""
    if isinstance(expected, str):
        with pytest.raises(ImageError, match="array") as caught:
            load_image(array)
        assert expected in str(caught.value)
    else:
        assert load_image(array)[0, :, 0].tolist() == expected


# ---------------------------------------------------------------- datasets
def _folder(root, label=np.array([[0, 1], [1, 255]]), image_size=(2, 2), classes="road\ncar\n", splits=("val",)):
    """A `folder` dataset with one image `p` (W, H = image_size) and its label map."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", image_size).save(root / "images" / "p.png")
    if label is not None:
        (root / "labels").mkdir()
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / "p.png")
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    for split in splits:
        (root / f"{split}.txt").write_text("p\n")
    return root


class _StubPredictor:
    """Labels of class 0 at the size of the image as load_image reads it, like a real predictor's."""

    protocol = SimpleNamespace(background_threshold=None)

    def __call__(self, image, vocabulary):
        return SimpleNamespace(labels=np.zeros(load_image(image).shape[:2], dtype=np.int64))


def _evaluate(root, split="val"):
    return evaluate_segmentation(_StubPredictor(), SegmentationDataset("folder", root, split), progress=False)


def _read_all(root, split="val", name="folder"):
    dataset = SegmentationDataset(name, root, split)
    return [dataset[i] for i in range(len(dataset))]


DATASETS = [
    pytest.param(lambda t: _folder(t, image_size=(3, 2)), _evaluate, ["labels/p.png", "2x2", "3x2"],
                 id="label-size-differs-from-image"),
    pytest.param(lambda t: _folder(t, label=np.array([[0, 2], [7, 255]])), _read_all, ["labels/p.png", "2, 7"],
                 id="label-values-not-class-or-255"),
    pytest.param(lambda t: _folder(t, label=np.zeros((2, 2, 3))), _read_all, ["labels/p.png", "one channel"],
                 id="rgb-label-map"),
    pytest.param(lambda t: (_folder(t), (t / "labels/p.png").write_bytes(b"\x89PNG broken"))[0], _read_all,
                 ["labels/p.png", "readable"], id="damaged-label-map"),
    pytest.param(lambda t: _folder(t, label=None), _read_all, ["labels/p.png", "missing"], id="missing-label-file"),
    pytest.param(lambda t: _folder(t, splits=("train",)), _read_all, ["val.txt", "train.txt"],
                 id="split-list-missing-beside-others"),
    pytest.param(lambda t: _folder(t, splits=()), lambda root: _read_all(root, "train"), ["train.txt"],
                 id="non-default-split-without-any-list"),
    pytest.param(lambda t: (_folder(t), (t / "val.txt").write_text("p\nq\n"))[0], _read_all, ["images", "q", "val.txt"],
                 id="split-lists-absent-image"),
    pytest.param(lambda t: _folder(t, classes=""), _read_all, ["classes.txt", "empty"], id="empty-classes-txt"),
    pytest.param(lambda t: _folder(t, classes="car\nroad\nCar\n"), _read_all, ["classes.txt", "car"],
                 id="duplicate-class-names"),
    pytest.param(lambda t: _folder(t, classes=None), _read_all, ["classes.txt"], id="missing-classes-txt"),
    pytest.param(_mkdir, lambda root: _read_all(root, name="voc21"),
                 ["ImageSets/Segmentation/val.txt"], id="voc-missing-split-list"),
    pytest.param(_mkdir, lambda root: _read_all(root, name="context59"),
                 ["ImageSets/SegmentationContext/val.txt"], id="context-missing-split-list"),
    pytest.param(_mkdir, lambda root: _read_all(root, name="ade150"), ["ade150", "val"],
                 id="ade-no-images-for-split"),
    pytest.param(lambda t: t / "absent", _read_all, ["absent", "not a folder"], id="missing-root"),
]


@pytest.mark.parametrize("make, run, names", DATASETS)
def test_dataset_refused(tmp_path, make, run, names):
    """InputError naming the file (and sizes, values or splits) instead of a traceback or a wrong score."""
    root = make(tmp_path / "data")
    with pytest.raises(InputError) as caught:
        run(root)
    message = str(caught.value).replace(str(tmp_path), "<tmp>")  # words must come from the message, not the path
    for name in names:
        assert name in message


def test_folder_without_any_split_list_uses_all_images_for_val(tmp_path, caplog):
    """Only with no split list at all, and for the default split, are all images taken; with a warning."""
    root = _folder(tmp_path, splits=())
    with caplog.at_level("WARNING", logger="ovdense"):
        assert len(SegmentationDataset("folder", root)) == 1
    assert "all 1 images" in caplog.text
    assert _evaluate(root)["aAcc"] == pytest.approx(100 * 1 / 3)  # class 0 predicted: right on 1 of 3 pixels


# ---------------------------------------------------------------- CLIP weights files and method checkpoints
class _RunsShell:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.w = torch.zeros(2)

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.w, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], shared=True, size=2, dtype=torch.uint8)
        self.w, self.marker, self.training = state[0] + written.float(), state[1], state[2]

    def forward(self, x):
        return x + self.w


def _tensors(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _clip_pt(tmp_path, tiny_vit):
    torch.save(_tensors(tiny_vit.model), tmp_path / "clip.pt")
    return tmp_path / "clip.pt"


def _clip_safetensors(tmp_path, tiny_vit):
    save_file(_tensors(tiny_vit.model), tmp_path / "clip.safetensors")
    return tmp_path / "clip.safetensors"


def _first_half(path, target):
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _fake_torchscript(tmp_path):
    with zipfile.ZipFile(tmp_path / "fake.pt", "w") as archive:
        for name in ("archive/constants.pkl", "archive/code/__torch__.py", "archive/data.pkl", "archive/version"):
            archive.writestr(name, b"garbage")
    return tmp_path / "fake.pt"


def _torchscript_with_data_pkl(tmp_path, payload: bytes):
    """A real TorchScript archive whose data.pkl is replaced by `payload`."""
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "real.pt"))
    with zipfile.ZipFile(tmp_path / "real.pt") as real, zipfile.ZipFile(tmp_path / "crafted.pt", "w") as out:
        for info in real.infolist():
            out.writestr(info, payload if info.filename.endswith("/data.pkl") else real.read(info.filename))
    return tmp_path / "crafted.pt"


# A TorchScript module whose attribute 'a' is itself: PROTO 2, GLOBAL, NEWOBJ, {'a': <itself>}, BUILD, STOP
_CYCLE = b"\x80\x02c__torch__\nX\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aq\x03h\x01sb."


def _method_checkpoint(tmp_path):
    metadata = {"method": "tcl", "model": "tiny-vit", "weights": "random", "config": "{}"}
    save_file({"decoder.weight": torch.zeros(2, 2)}, tmp_path / "tcl.safetensors", metadata=metadata)
    return tmp_path / "tcl.safetensors"


def _bad_config(tmp_path):
    metadata = {"method": "tcl", "model": "tiny-vit", "weights": "random", "config": "{not json"}
    save_file({"decoder.weight": torch.zeros(2, 2)}, tmp_path / "badconfig.safetensors", metadata=metadata)
    return tmp_path / "badconfig.safetensors"


def _rn_state_dict(tmp_path):
    torch.save(_tensors(open_clip.create_model("tiny-rn")), tmp_path / "rn.pt")
    return tmp_path / "rn.pt"


def _folder_path(tmp_path):
    (tmp_path / "weights.pt").mkdir()
    return tmp_path / "weights.pt"


# make(tmp_path, marker, tiny_vit) -> path; the same corpus goes to load_clip and to read_trained
CHECKPOINTS = {
    "empty-file": lambda t, m, v: _write(t / "empty.pt", b""),
    "truncated-torch-zip": lambda t, m, v: _first_half(_clip_pt(t, v), t / "half.pt"),
    "truncated-safetensors": lambda t, m, v: _first_half(_clip_safetensors(t, v), t / "half.safetensors"),
    "text-file": lambda t, m, v: _write(t / "notes.pt", b"hello, these are not weights\n"),
    "pickle-os-system": lambda t, m, v: _write(t / "evil.pt", pickle.dumps(_RunsShell(m))),
    "torch-save-os-system": lambda t, m, v: (torch.save({"x": _RunsShell(m)}, t / "evil_zip.pt"), t / "evil_zip.pt")[1],
    "fake-torchscript-zip": lambda t, m, v: _fake_torchscript(t),
    "torchscript-data-pkl-os-system": lambda t, m, v: _torchscript_with_data_pkl(t, pickle.dumps(_RunsShell(m), 2)),
    "torchscript-setstate-writes-file": lambda t, m, v: (torch.jit.script(_WritesOnLoad(str(m))).save(
        str(t / "setstate.pt")), t / "setstate.pt")[1],
    "torchscript-modules-in-a-cycle": lambda t, m, v: _torchscript_with_data_pkl(t, _CYCLE),
    "state-dict-of-other-architecture": lambda t, m, v: _rn_state_dict(t),
    "directory": lambda t, m, v: _folder_path(t),
}
CLIP_ONLY = {"method-checkpoint-as-clip-weights": lambda t, m, v: _method_checkpoint(t)}
METHOD_ONLY = {
    "clip-safetensors-as-method-checkpoint": lambda t, m, v: _clip_safetensors(t, v),
    "method-config-not-json": lambda t, m, v: _bad_config(t),
    "missing-file": lambda t, m, v: t / "absent.safetensors",
}


@pytest.mark.parametrize("make", [pytest.param(f, id=k) for k, f in {**CHECKPOINTS, **CLIP_ONLY}.items()])
def test_clip_weights_refused(tmp_path, tiny_vit, make):
    """load_clip(name, file): CheckpointError naming the file; nothing in the file runs."""
    marker = tmp_path / "MARKER"
    path = make(tmp_path, marker, tiny_vit)
    with pytest.raises(CheckpointError) as caught:
        load_clip("tiny-vit", str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists(), "the checkpoint ran code"


@pytest.mark.parametrize("make", [pytest.param(f, id=k) for k, f in {**CHECKPOINTS, **METHOD_ONLY}.items()])
def test_method_checkpoint_refused(tmp_path, tiny_vit, make):
    """read_trained(file): CheckpointError naming the file; nothing in the file runs."""
    marker = tmp_path / "MARKER"
    path = make(tmp_path, marker, tiny_vit)
    with pytest.raises(CheckpointError) as caught:
        read_trained(path)
    assert str(path) in str(caught.value)
    assert not marker.exists(), "the checkpoint ran code"


def test_torch_jit_load_would_run_the_crafted_setstate(tmp_path):
    """Why TorchScript archives are read by our own unpickler: torch.jit.load runs the archive's code."""
    marker = tmp_path / "MARKER"
    torch.jit.script(_WritesOnLoad(str(marker))).save(str(tmp_path / "setstate.pt"))
    torch.jit.load(str(tmp_path / "setstate.pt"))
    assert marker.exists()


class _Buffers(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.inner = torch.nn.Linear(3, 2).to(dtype if dtype.is_floating_point else torch.float32)
        self.register_buffer("table", torch.arange(6).reshape(2, 3).t().to(dtype))  # not contiguous

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool],
                         ids=str)
def test_torchscript_weights_match_torch_jit_load(tmp_path, dtype):
    """On a trusted archive, the safe reader gives exactly the tensors torch.jit.load does."""
    torch.jit.script(_Buffers(dtype)).save(str(tmp_path / "trusted.pt"))
    expected = torch.jit.load(str(tmp_path / "trusted.pt")).state_dict()
    weights = _torchscript_weights(tmp_path / "trusted.pt")
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value)


@pytest.fixture(scope="module")
def shipped_models():
    """The shipped DenseCLIP segmenter and the shipped RegionCLIP and GLIP detectors (the tiny synthetic models)."""
    from ovdense.shipped import shipped
    from ovdense.detection.predictor import DetectionPredictor, GroundingPredictor
    from ovdense.methods import load_detector
    from ovdense.predictor import build_predictor
    denseclip = shipped("segmenter", "denseclip")
    segmenter = build_predictor(method="denseclip", checkpoint=str(denseclip.path), preset="synthetic")
    regionclip, regionclip_preset = load_detector("regionclip", None, "synthetic", "cpu")
    glip, glip_preset = load_detector("glip", None, "synthetic", "cpu")
    return (segmenter, DetectionPredictor(regionclip, regionclip_preset),
            GroundingPredictor(glip, glip_preset))


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3000), (1, 10000), (10000, 1), (10, 300)])
def test_thin_images_are_segmented_detected_and_grounded(shipped_models, height, width):
    """An image thinner than a patch after resizing is padded, not a crash: DenseCLIP's pyramid pools twice, and
    RegionCLIP's ResNet needs 32 px."""
    segmenter, regionclip, glip = shipped_models
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert segmenter(image, "sky, grass").labels.shape == (height, width)
    for detector in (regionclip, glip):
        boxes = detector(image, "star, bar").boxes
        assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
    glip.set_image(image)
    assert glip.ground("a star", None).class_names == ["a star"]


def test_image_bytes_load_as_their_file_does(tmp_path, scene):
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    assert np.array_equal(load_image(path.read_bytes()), load_image(path))
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not an image PIL can read"):
        load_image(b"definitely not an image")
