"""ONNX export of a training-free segmenter: onnxruntime against torch, for a ViT and a ResNet, at several sizes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from ovdense.cli import main  # noqa: E402
from ovdense.onnx_export import DenseEncoder, export_onnx  # noqa: E402
from ovdense.onnx_runtime import OnnxSegmenter  # noqa: E402
from ovdense.text import TextEmbeddingCache  # noqa: E402


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_onnxruntime_features_equal_torch_at_any_size(name, request, tmp_path):
    clip = request.getfixturevalue(name)
    export_onnx(clip, "maskclip", ["red", "blue"], ("a photo of a {}.",), tmp_path)
    segmenter = OnnxSegmenter(tmp_path)
    encoder = DenseEncoder(clip, "maskclip").eval()
    for shape in [(1, 3, 64, 96), (3, 3, 96, 64), (1, 3, 128, 128)]:
        pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = encoder(pixels).numpy()
        got = segmenter.features(pixels.numpy())
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    text = TextEmbeddingCache().embed(clip, ["red", "blue"], ("a photo of a {}.",)).float().numpy()
    assert np.abs(segmenter.text - text).max() <= 1e-6


def test_the_runtime_segments_without_torch_as_its_features_say(tiny_vit, scene, tmp_path):
    export_onnx(tiny_vit, "maskclip", "red; crimson, blue", ("a photo of a {}.",), tmp_path)
    segmenter = OnnxSegmenter(tmp_path, short=64)
    labels, probs = segmenter(scene)
    assert segmenter.classes == ["red", "blue"] and segmenter.text.shape[0] == 3  # red, crimson, blue
    assert labels.shape == scene.shape[:2] and probs.shape == (2, *scene.shape[:2])
    # the same pipeline in torch: cosine logits x 100, bilinear upsampling (PIL's equals align_corners=False),
    # softmax over the three queries, the best of red's two synonyms
    features = torch.from_numpy(segmenter.features(segmenter.prepare(scene)))
    logits = torch.einsum("bdhw,qd->bqhw", features, torch.from_numpy(segmenter.text)) * 100
    expected = torch.nn.functional.interpolate(logits, size=scene.shape[:2], mode="bilinear", align_corners=False)
    expected = expected.softmax(dim=1)[0]
    expected = torch.stack([expected[:2].amax(dim=0), expected[2]]).numpy()
    assert np.abs(probs - expected).max() < 1e-3
    assert (labels == expected.argmax(axis=0)).mean() > 0.999
    code = "import sys, ovdense.onnx_runtime; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # the runtime never imports torch


def test_export_from_the_cli_writes_the_three_files(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["--quiet", "export", "--format", "onnx", "--classes", "sky, grass, red star", "--templates",
                 "single", "--output", str(out)]) == 0
    config = json.loads((out / "ovdense_onnx.json").read_text())
    assert config["classes"] == ["sky", "grass", "red star"] and config["model"] == "ovdense-tiny-vit"
    assert np.load(out / "text_embeddings.npy").shape == (3, 128) and (out / "image_encoder.onnx").is_file()
    assert main(["--quiet", "export", "--format", "tflite", "--classes", "sky", "--output", str(out)]) == 2
