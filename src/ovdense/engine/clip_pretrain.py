"""Train a tiny CLIP from scratch on the synthetic world's captions, and measure it zero-shot on object crops."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from ..backbones import CLIPBackbone
from ..data.export import scene_index
from ..data.synthetic import SyntheticWorld
from ..io import atomic_path
from ..text import TextEmbeddingCache
from .trainer import TrainConfig, Trainer


def to_tensor(image: np.ndarray, mean, std, size: int | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) normalised float tensor."""
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class SyntheticCaptions(torch.utils.data.Dataset):
    """Item i: (image (3, S, S) normalised, caption string) of train scene i // k, caption i % k (k per scene).

    Scenes are generated on first use and kept in memory as uint8 arrays.
    """

    def __init__(self, world: SyntheticWorld, scenes: int, captions_per_scene: int = 3, split: str = "train",
                 mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD):
        self.world, self.scenes, self.k, self.split = world, scenes, captions_per_scene, split
        self.mean, self.std = mean, std
        self._cache: dict[int, tuple[np.ndarray, list[str]]] = {}

    def __len__(self) -> int:
        return self.scenes * self.k

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene_id, caption_id = divmod(index, self.k)
        if scene_id not in self._cache:
            scene = self.world.scene(scene_index(self.split, scene_id))
            self._cache[scene_id] = (scene.image, [c.text for c in scene.captions])
        image, captions = self._cache[scene_id]
        return to_tensor(image, self.mean, self.std), captions[caption_id % len(captions)]


def clip_loss(model, batch) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE between the batch's images and captions (open_clip's ClipLoss, gathered under DDP)."""
    images, tokens = batch
    image_features, text_features, logit_scale = model(images, tokens)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    loss = open_clip.ClipLoss(gather_with_grad=True, rank=rank, world_size=world)(
        image_features, text_features, logit_scale)
    return {"loss": loss, "logit_scale": logit_scale.detach()}


@torch.no_grad()
def zero_shot_crops(backbone: CLIPBackbone, world: SyntheticWorld, scenes: int = 200, split: str = "val",
                    template: str = "a photo of a {}.") -> dict[str, float]:
    """Shape classification accuracy (%) of object crops among all thing names, for base and novel things.

    Each visible object is cropped as a square around its box (25% margin) and resized to the model's input.
    """
    size = backbone.visual.image_size[0]
    text = TextEmbeddingCache().embed(backbone, list(world.things), (template,)).to(backbone.device)
    crops, truth = [], []
    for i in range(scenes):
        scene = world.scene(scene_index(split, i))
        height, width = scene.semantic.shape
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            half = 0.625 * max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = [max(0, int(cx - half)), max(0, int(cy - half)), min(width, int(cx + half) + 1),
                   min(height, int(cy + half) + 1)]
            crop = scene.image[box[1]:box[3], box[0]:box[2]]
            crops.append(to_tensor(crop, backbone.image_mean, backbone.image_std, size))
            truth.append(world.things.index(obj.category))
    images = torch.stack(crops).to(backbone.device)
    features = torch.cat([F.normalize(backbone.encode_image(images[i:i + 256]), dim=-1)
                          for i in range(0, len(images), 256)])
    predicted = (features @ text.T).argmax(dim=1).cpu()
    truth = torch.tensor(truth)
    novel = torch.tensor([world.things[t] in world.novel for t in truth.tolist()])
    correct = (predicted == truth).float()
    return {"zs_base_acc": 100 * float(correct[~novel].mean()), "zs_novel_acc": 100 * float(correct[novel].mean()),
            "zs_crops": len(truth), "chance_acc": 100 / len(world.things)}


@dataclass
class PretrainConfig:
    """A tiny-CLIP recipe (YAML): architecture, world, data size, training settings, export path."""

    model: str = "ovdense-tiny-vit"
    world: dict = field(default_factory=lambda: {"size": 64, "seed": 0, "max_objects": 3})
    scenes: int = 20000
    captions_per_scene: int = 3
    eval_scenes: int = 200
    train: dict = field(default_factory=dict)
    export: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PretrainConfig":
        return cls(**(yaml.safe_load(Path(path).read_text()) or {}))


def pretrain_clip(config: PretrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = True,
                  max_steps: int | None = None, progress: bool = True) -> tuple[CLIPBackbone, dict]:
    """Train `config.model` from random weights on synthetic captions; returns the backbone and final zero-shot scores.

    With `config.export`, the final weights are written there as fp16 safetensors.
    """
    world = SyntheticWorld(**config.world)
    model = open_clip.create_model(config.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model)
    backbone = CLIPBackbone(model, tokenizer, name=config.model, weights=f"training:{out_dir}")
    data = SyntheticCaptions(world, config.scenes, config.captions_per_scene)

    def collate(items):
        images, texts = zip(*items)
        return torch.stack(images), tokenizer(list(texts))

    def evaluate(_model):
        return zero_shot_crops(backbone, world, config.eval_scenes)

    train_config = TrainConfig(**config.train)
    trainer = Trainer(model, clip_loss, data, train_config, out_dir, collate=collate, evaluate=evaluate,
                      device=device, progress=progress)
    trainer.fit(resume=resume, max_steps=max_steps)
    model.eval()
    scores = evaluate(model)
    if config.export and trainer.rank == 0:
        with atomic_path(config.export) as tmp:
            save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"model": config.model, "steps": str(trainer.step)})
    return backbone, scores
