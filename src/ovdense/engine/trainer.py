"""One training loop for every trainable method: AMP, accumulation, warm-up + cosine schedule,
atomic checkpoints with exact resume, progress bar, CSV metrics log, and torchrun DDP.

Batches, augmentations and random layers are pure functions of (seed, step): after a kill, resuming
from the last checkpoint replays exactly the steps that a run without the kill would have taken.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..distributed import init_distributed
from ..errors import CheckpointError, InputError
from ..io import atomic_path
from ..state import load_trained_state, trained_state
from . import checks

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "poly")
GRAD_CLIP_TYPES = ("total", "per-parameter")
OPTIMIZERS = ("adamw", "sgd")


def native_cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's test: AVX-512 or AMX cores); elsewhere, e.g. on
    AVX2-only CPUs, autocast emulates it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class TrainConfig:
    """steps: optimizer steps; batch_size: global samples per step (split over ranks and accumulation).

    optimizer: 'adamw' or 'sgd' (momentum 0.9, detectron2's).
    schedule: 'cosine' (to 0) or 'poly' (power 0.9, mmseg's), both after a linear warm-up.
    grad_clip_type: 'total' (one norm over all gradients, torch's clip_grad_norm_) or 'per-parameter' (each
    parameter's gradient norm clipped on its own: detectron2's CLIP_TYPE 'norm', RegionCLIP's pretraining).
    lr_mult: parameter-name prefix -> learning-rate multiplier (e.g. {'backbone.visual': 0.1}).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    accumulate: int = 1
    amp: bool = False
    grad_clip: float | None = 1.0
    grad_clip_type: str = "total"
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0
    seed: int = 0
    num_workers: int = 0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    lr_mult: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every setting is checked here, by name: a recipe's mistake is found before any data or model work."""
        for key in ("steps", "batch_size", "accumulate", "log_every", "checkpoint_every"):
            checks.integer(key, getattr(self, key), minimum=1)
        for key in ("warmup_steps", "eval_every", "num_workers", "seed"):
            checks.integer(key, getattr(self, key), minimum=0)
        checks.number("lr", self.lr, positive=True)
        checks.number("weight_decay", self.weight_decay, minimum=0)
        checks.boolean("amp", self.amp)
        if self.grad_clip is not None:
            checks.number("grad_clip", self.grad_clip, minimum=0)
        if self.batch_size % self.accumulate:
            raise InputError(f"batch_size: {self.batch_size} is not divisible by accumulate ({self.accumulate}); "
                             "each step takes batch_size / accumulate samples per micro-batch")
        checks.choice("schedule", self.schedule, SCHEDULES)
        checks.choice("optimizer", self.optimizer, OPTIMIZERS)
        checks.choice("grad_clip_type", self.grad_clip_type, GRAD_CLIP_TYPES)
        for prefix, mult in checks.mapping("lr_mult", self.lr_mult).items():
            checks.text("lr_mult (a parameter-name prefix)", prefix)
            checks.number(f"lr_mult.{prefix}", mult, minimum=0)

    @classmethod
    def from_dict(cls, values) -> "TrainConfig":
        """From a recipe's `train` mapping; an unknown key is an error suggesting the closest known one."""
        values = checks.mapping("train", values if values is not None else {})
        checks.known_keys(values, [f.name for f in fields(cls)], "a train section (TrainConfig)")
        return cls(**values)


def clip_gradients(parameters, max_norm: float, kind: str = "total") -> None:
    """Clip gradients in place to `max_norm`: their total norm ('total') or each parameter's own ('per-parameter')."""
    parameters = [p for p in parameters if p.grad is not None]
    if kind == "total":
        nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        for parameter in parameters:
            nn.utils.clip_grad_norm_([parameter], max_norm)


def batch_positions(step: int, micro: int, config: TrainConfig, size: int, rank: int = 0, world: int = 1
                    ) -> list[tuple[int, int]]:
    """(dataset index, epoch) of each sample of micro-batch `micro` of step `step` on `rank`; epochs are seeded
    permutations."""
    per_step = config.batch_size
    per_micro = per_step // config.accumulate
    start = step * per_step + micro * per_micro
    out = []
    for position in range(start + rank, start + per_micro, world):
        epoch, offset = divmod(position, size)
        out.append((_epoch_order(config.seed, epoch, size)[offset], epoch))
    return out


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


_ELSEWHERE = "start afresh with --restart (the file is replaced once the new run checkpoints) or train into another --output"
_CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "step")


def read_checkpoint(path: str | Path, device="cpu", mmap: bool = False) -> dict:
    """The training state in `path` (torch.load with weights_only=True); anything else is a CheckpointError.

    mmap: map the tensors instead of reading them (a cheap look at what the checkpoint is)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; a training checkpoint (last.pt) was expected there")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a training checkpoint (a write was cut short?); {_ELSEWHERE}")
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:  # torch.load raises many types for damaged files: pickle, zip, EOF, Runtime, ...
        raise CheckpointError(f"{path} cannot be read as a training checkpoint (damaged or truncated? "
                              f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                              f"{_ELSEWHERE}") from error
    if not isinstance(state, dict) or not all(k in state for k in _CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not an ovdense training checkpoint (it lacks "
                              f"{', '.join(k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state)}"
                              f"); {_ELSEWHERE}")
    return state


def check_same_run(path: Path, saved: dict, current: dict) -> None:
    """The checkpoint's run (method, model settings) is the one being trained; a checkpoint from before runs were
    recorded passes (its weights are still checked against the model)."""
    method, other = current.get("method"), saved.get("method")
    recipe = f" (recipe {saved['recipe']})" if saved.get("recipe") else ""
    if method and other and method != other:
        raise CheckpointError(f"{path} is a checkpoint of `ovdense train {other}`{recipe}, not of "
                              f"`ovdense train {method}`; {_ELSEWHERE}")
    model, other_model = current.get("model"), saved.get("model")
    if model is not None and other_model is not None and model != other_model:
        keys = sorted(k for k in set(model) | set(other_model) if model.get(k) != other_model.get(k))
        changes = ", ".join(f"{k}: {other_model.get(k)!r} there, {model.get(k)!r} now" for k in keys[:4])
        raise CheckpointError(f"{path} was written by a run of another model{recipe} ({changes}); {_ELSEWHERE}")


def check_resume(out_dir: str | Path, method: str) -> None:
    """Before any data or model work: the checkpoint a run would resume from (out_dir/last.pt), if there, must be
    a readable training checkpoint of `method`; else a CheckpointError (the file is left as it is)."""
    path = Path(out_dir) / "last.pt"
    if path.exists():
        check_same_run(path, read_checkpoint(path, mmap=True).get("run") or {}, {"method": method})


@contextmanager
def seeded(seed: int):
    """Run the block (e.g. building a model) with the global RNG seeded by `seed`, then restore the RNG: the
    initial weights are a function of the recipe's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    if config.schedule == "poly":
        return config.lr * (1 - progress) ** 0.9
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains `model` by minimising `loss_fn(model, batch)['loss']` over `dataset`.

    loss_fn returns a dict of scalar tensors; all are logged, 'loss' is optimised.
    collate: turns a list of dataset items into a batch. evaluate(model) -> dict of numbers, logged.
    run: what this training is, recorded in last.pt and checked on resume: {'method': 'tcl', 'recipe': path,
        'model': {settings that define the model}}; a checkpoint of another method or model is a CheckpointError.
    Files in out_dir: last.pt (checkpoint, written atomically), metrics.csv.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, config: TrainConfig, out_dir: str | Path,
                 collate: Callable | None = None, evaluate: Callable | None = None, device: str = "cpu",
                 progress: bool = True, find_unused_parameters: bool = False, run: dict | None = None):
        self.run = dict(run or {})
        self.rank, self.world = init_distributed()
        if str(device) == "cuda" and self.world > 1:  # one GPU per torchrun process
            device = f"cuda:{os.environ.get('LOCAL_RANK', self.rank)}"
            torch.cuda.set_device(device)
        self.model, self.loss_fn, self.dataset, self.config = model.to(device), loss_fn, dataset, config
        self.out_dir, self.collate, self.evaluate, self.device = Path(out_dir), collate, evaluate, device
        self.progress = progress and self.rank == 0
        groups: dict[tuple[float, float], list] = {}  # (lr multiplier, weight decay) -> parameters
        for name, p in model.named_parameters():
            if p.requires_grad:
                mult = next((m for prefix, m in config.lr_mult.items() if name.startswith(prefix)), 1.0)
                groups.setdefault((mult, config.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
        param_groups = [{"params": ps, "lr_mult": mult, "weight_decay": decay} for (mult, decay), ps in groups.items()]
        self.optimizer = (torch.optim.AdamW(param_groups, lr=config.lr) if config.optimizer == "adamw"
                          else torch.optim.SGD(param_groups, lr=config.lr, momentum=0.9))
        cuda = str(device).startswith("cuda")
        self.device_type, self.amp_dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.bfloat16)
        self.amp = config.amp and (cuda or native_cpu_bfloat16())
        if config.amp and not self.amp and self.rank == 0:
            logger.warning("train.amp: this CPU has no native bfloat16 (oneDNN finds no AVX-512 or AMX), where "
                           "autocast would be over 10x slower than float32; training in float32")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and cuda)
        self.wrapped = model
        if self.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None,
                                                               find_unused_parameters=find_unused_parameters)
        self.step = 0

    @property
    def finished(self) -> bool:
        """Whether training has reached config.steps (a run stopped by max_steps has not)."""
        return self.step >= self.config.steps

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "last.pt"

    def save(self) -> None:
        """Write trained weights, optimizer, scaler, step and what the run is to last.pt atomically (rank 0 only)."""
        if self.rank != 0:
            return
        state = {"model": trained_state(self.model), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": self.step, "config": asdict(self.config),
                 "run": self.run}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def load(self) -> bool:
        """Resume from last.pt if it exists; returns whether it did.

        A file that is not a training checkpoint (empty, truncated, damaged, something else) or the checkpoint of
        another method or model raises CheckpointError; the old file is left untouched.
        """
        path = self.checkpoint_path
        if not path.exists():
            return False
        state = read_checkpoint(path, self.device)
        check_same_run(path, state.get("run") or {}, self.run)
        try:
            load_trained_state(self.model, state["model"], str(path))
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, RuntimeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path} does not fit the model being trained ({error}); {_ELSEWHERE}") from error
        self.step = int(state["step"])
        return True

    def _log(self, row: dict) -> None:
        if self.rank != 0:
            return
        path = self.out_dir / "metrics.csv"
        rows = []
        if path.is_file():  # keep the rows of steps before this one (a resumed run rewrites the rest)
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) < row["step"]]
        rows.append(row)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def _batches(self, end: int):
        """Micro-batches of steps self.step..end-1 in order, loaded by `num_workers` DataLoader workers."""
        size, first = len(self.dataset), self.step
        order = (batch_positions(step, micro, self.config, size, self.rank, self.world)
                 for step in range(first, end) for micro in range(self.config.accumulate))
        loader = torch.utils.data.DataLoader(_ByPosition(self.dataset), batch_sampler=order,
                                             collate_fn=self.collate or torch.utils.data.default_collate,
                                             num_workers=self.config.num_workers)
        for batch in loader:
            yield _to_device(batch, self.device)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over the next `accumulate` micro-batches of `batches`; returns the averaged logged values."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config) * group["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(self.config.accumulate):
            batch = next(batches)
            # random layers (dropout, Gumbel noise) draw from a stream seeded by (seed, step, micro-batch, rank)
            torch.manual_seed(((self.config.seed * 1_000_003 + self.step) * 1_009 + micro) * 1_013 + self.rank)
            with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype, enabled=self.amp):
                values = self.loss_fn(self.wrapped, batch)
            self.scaler.scale(values["loss"] / self.config.accumulate).backward()
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / self.config.accumulate
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.model.parameters(), self.config.grad_clip, self.config.grad_clip_type)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return totals

    def fit(self, resume: bool = True, max_steps: int | None = None) -> None:
        """Train until config.steps (or `max_steps` more steps), checkpointing every checkpoint_every steps."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.load() and self.progress:
            print(f"resumed from {self.checkpoint_path} at step {self.step}")
        end = self.config.steps if max_steps is None else min(self.config.steps, self.step + max_steps)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="train", disable=not self.progress, unit="step")
        batches = self._batches(end)
        while self.step < end:
            values = self.train_step(batches)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            row = None
            if self.step % self.config.log_every == 0 or self.step == end:
                row = {"step": self.step, "lr": lr_at(self.step - 1, self.config), **values}
            if self.evaluate and self.config.eval_every and self.step % self.config.eval_every == 0:
                self.model.eval()
                row = {**(row or {"step": self.step}), **self.evaluate(self.model)}
            if row:
                self._log(row)
            if self.step % self.config.checkpoint_every == 0 or self.step == end:
                self.save()
        bar.close()


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _ByPosition(torch.utils.data.Dataset):
    """Reads a dataset by (index, epoch): `sample(index, epoch)` where the dataset augments per epoch, else [index]."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: tuple[int, int]):
        index, epoch = position
        sample = getattr(self.dataset, "sample", None)
        return sample(index, epoch) if sample else self.dataset[index]
