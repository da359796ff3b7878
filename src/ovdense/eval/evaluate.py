"""Evaluate a segmentation predictor over a dataset, on one process or under torchrun."""
from __future__ import annotations

import torch.distributed as dist
from tqdm import tqdm

from ..data import SegmentationDataset
from ..distributed import init_distributed
from ..errors import InputError
from .metrics import SegmentationMetric


def evaluate_segmentation(predictor, dataset: SegmentationDataset, limit: int | None = None,
                          progress: bool = True) -> dict:
    """mIoU / mAcc / aAcc (and per-class lists) of `predictor` on `dataset` with its own vocabulary.

    Under torchrun each rank takes every WORLD_SIZE-th image and the confusion matrices are summed.
    Raises InputError naming the file for a label map whose size differs from its image's.
    """
    vocabulary = dataset.vocabulary
    if vocabulary.background is None and predictor.protocol.background_threshold is not None:
        raise InputError(f"{dataset.name} has no background class, so a background threshold cannot be used")
    rank, world = init_distributed()
    indices = range(len(dataset))[:limit][rank::world]
    metric = SegmentationMetric(len(vocabulary))
    for index in tqdm(indices, desc=f"eval {dataset.name}", disable=not progress or rank != 0, unit="img"):
        image, target = dataset[index]
        result = predictor(image, vocabulary)  # labels at the size of the image as loaded
        dataset.check_size(index, result.labels.shape, target)
        metric.update(result.labels, target)
    if world > 1:
        confusion = metric.confusion.to(predictor.device)
        dist.all_reduce(confusion)
        metric.confusion = confusion.cpu()
    return metric.compute()
