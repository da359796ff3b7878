"""Shared fixtures: tiny open_clip architectures (random weights) so every test runs offline in seconds."""
import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The on-disk text-embedding cache of the whole session: a fresh folder, never the user's ~/.cache/ovdense.
os.environ["OVDENSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ovdense-test-cache-")
atexit.register(shutil.rmtree, os.environ["OVDENSE_CACHE_DIR"], ignore_errors=True)

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ovdense.backbones import load_clip  # noqa: E402

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "tiny-vit": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                                  "head_width": 32}, "text_cfg": _TEXT},
    "tiny-rn": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                                 "head_width": 32}, "text_cfg": _TEXT},
}


@pytest.fixture(scope="session", autouse=True)
def tiny_model_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    for name, config in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit(tiny_model_configs):
    return load_clip("tiny-vit", "random")


@pytest.fixture(scope="session")
def tiny_rn(tiny_model_configs):
    return load_clip("tiny-rn", "random")


@pytest.fixture
def scene():
    """A (96, 128, 3) uint8 image: left half red, right half blue, with a bit of noise."""
    rng = np.random.default_rng(0)
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    image[:, :64] = (220, 30, 30)
    image[:, 64:] = (30, 30, 220)
    return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
