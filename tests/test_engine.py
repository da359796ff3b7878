"""The training engine and the tiny-CLIP pre-training: schedule, data order, loss falls, exact resume."""
import csv

import open_clip
import pytest
import torch

from ovdense.data.synthetic import SyntheticWorld
from ovdense.engine import TrainConfig, Trainer, batch_positions, lr_at
from ovdense.engine.clip_pretrain import SyntheticCaptions, clip_loss


def batch_indices(*args, **kwargs):
    return [index for index, _ in batch_positions(*args, **kwargs)]


def test_schedule_and_data_order():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, batch_size=8, accumulate=2, seed=3)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.5) and lr_at(100, config) == pytest.approx(0.0)
    epoch = [i for step in range(5) for micro in range(2) for i in batch_indices(step, micro, config, 40)]
    assert sorted(epoch) == list(range(40))  # one epoch visits every item once
    assert batch_indices(7, 1, config, 40) == batch_indices(7, 1, config, 40)
    ranks = [batch_indices(2, 0, config, 40, rank=r, world=2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(batch_indices(2, 0, config, 40))
    assert {epoch for _, epoch in batch_positions(5, 0, config, 40)} == {1}  # step 5 starts the second epoch
    poly = TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="poly")
    assert lr_at(50, poly) == pytest.approx(0.5 ** 0.9) and lr_at(100, poly) == pytest.approx(0.0)


def _tiny_clip_trainer(tmp_path, steps, seed=0):
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-vit", pretrained=None)
    tokenizer = open_clip.get_tokenizer("tiny-vit")
    data = SyntheticCaptions(SyntheticWorld(64, seed=0, max_objects=2), scenes=64, captions_per_scene=1)

    def collate(items):
        images, texts = zip(*items)
        return torch.stack(images), tokenizer(list(texts))

    config = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=2)
    return Trainer(model, clip_loss, data, config, tmp_path, collate=collate, progress=False)


def test_clip_contrastive_loss_falls(tmp_path):
    trainer = _tiny_clip_trainer(tmp_path, steps=30)
    trainer.fit()
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_resume_after_kill_gives_the_same_next_steps(tmp_path):
    straight = _tiny_clip_trainer(tmp_path / "a", steps=4)
    straight.fit()
    killed = _tiny_clip_trainer(tmp_path / "b", steps=4)
    killed.fit(max_steps=2)  # "killed" after the checkpoint of step 2
    resumed = _tiny_clip_trainer(tmp_path / "b", steps=4, seed=1)  # a fresh process, other random init
    resumed.fit()
    assert resumed.step == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]  # no temporary files left
