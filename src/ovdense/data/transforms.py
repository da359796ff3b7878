"""Training augmentations of image + label-map pairs (mmsegmentation's standard pipeline).

Random resize (keep ratio, scale x ratio in `ratio_range`), random crop (re-drawn up to 10 times while
one class covers more than `cat_max_ratio` of it), horizontal flip, photometric distortion (brightness,
contrast, saturation, hue), normalisation and padding to the crop size (image 0, labels 255).
Every draw comes from the given numpy Generator, so an item is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .datasets import IGNORE_INDEX
from .images import load_image


@dataclass
class SegmentationAugment:
    """scale: (long, short) size the image is fitted into before the ratio ((2048, 512) for ADE20K)."""

    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, mean, std
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8, (H, W) int labels -> (3, crop, crop) normalised float, (crop, crop) int64."""
        image, label = self._resize(image, label, rng)
        image, label = self._crop(image, label, rng)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        pixels = torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1)
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)
        pixels = (pixels.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        labels = torch.tensor(np.ascontiguousarray(label)).long()
        pad_h, pad_w = self.crop - pixels.shape[1], self.crop - pixels.shape[2]
        if pad_h > 0 or pad_w > 0:
            pixels = torch.nn.functional.pad(pixels, (0, max(0, pad_w), 0, max(0, pad_h)), value=0.0)
            labels = torch.nn.functional.pad(labels, (0, max(0, pad_w), 0, max(0, pad_h)), value=IGNORE_INDEX)
        return pixels, labels

    def _resize(self, image, label, rng):
        ratio = rng.uniform(*self.ratio_range)
        long_side, short_side = self.scale[0] * ratio, self.scale[1] * ratio
        height, width = label.shape
        factor = min(long_side / max(height, width), short_side / min(height, width))
        size = (max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)
        return image, label

    def _crop(self, image, label, rng):
        height, width = label.shape
        crop_h, crop_w = min(self.crop, height), min(self.crop, width)
        for _ in range(10):
            y = int(rng.integers(0, height - crop_h + 1))
            x = int(rng.integers(0, width - crop_w + 1))
            window = label[y:y + crop_h, x:x + crop_w]
            counts = np.bincount(window[window != IGNORE_INDEX].ravel())
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[y:y + crop_h, x:x + crop_w], window


def photometric_distortion(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a (3, H, W) uint8 tensor: each step with probability 1/2 - brightness
    +-32, contrast x[0.5, 1.5] (before or after the colour steps), saturation x[0.5, 1.5], hue +-18 degrees."""
    x = pixels.float()
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        x = x * contrast
    x = x.clamp(0, 255).to(torch.uint8)
    if rng.random() < 0.5:
        x = TF.adjust_saturation(x, rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        x = TF.adjust_hue(x, rng.uniform(-18, 18) / 360)
    if not contrast_first and contrast is not None:
        x = (x.float() * contrast).clamp(0, 255).to(torch.uint8)
    return x


class AugmentedSegmentation(torch.utils.data.Dataset):
    """A SegmentationDataset with training augmentation: sample(index, epoch) -> (image (3, S, S), labels (S, S))."""

    def __init__(self, dataset, augment: SegmentationAugment, mean, std, seed: int = 0):
        self.dataset, self.augment, self.mean, self.std, self.seed = dataset, augment, mean, std, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.dataset[index]
        image = load_image(path)
        self.dataset.check_size(index, image.shape[:2], label)
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.augment(image, label, rng, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index, 0)
