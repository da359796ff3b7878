"""The training engine and the tiny-CLIP pre-training: schedule, data order, loss falls, exact resume."""
import csv
import logging
from functools import partial
import os
import stat

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import CLIPBackbone
from ovdense.data.synthetic import COLOURS, SyntheticWorld
from ovdense.engine import TrainConfig, Trainer, batch_positions, lr_at
from ovdense.engine.clip_pretrain import (PatchCLIP, SyntheticCaptions, caption_batch, clip_loss, patch_targets,
                                         phrase_text, thing_index, top_k_caption_logits, true_of)
from ovdense.data.export import scene_index
from ovdense.engine import trainer as trainer_module
from ovdense.engine.trainer import check_resume, clip_gradients, read_checkpoint, seeded
from ovdense.errors import CheckpointError, InputError
from ovdense.io import PACKAGE_DIR, atomic_path, inside_package, write_text_atomic


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


def _patch_clip(model, readout="plain"):
    return PatchCLIP(CLIPBackbone(model, open_clip.get_tokenizer("tiny-vit"), "tiny-vit", "test"), readout)


def _tiny_clip_trainer(tmp_path, steps, seed=0, close_ups=0.0, token_weight=0.0, views="centred", mil_weight=0.0,
                       scene_weight=0.0):
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-vit", pretrained=None)
    world = SyntheticWorld(64, seed=0, max_objects=2)
    data = SyntheticCaptions(world, scenes=64, captions_per_scene=1, close_ups=close_ups, views=views)
    collate = partial(caption_batch, tokenizer=open_clip.get_tokenizer("tiny-vit"), world=world,
                      phrases=scene_weight > 0)
    config = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=2, log_every=1, checkpoint_every=2)
    loss = partial(clip_loss, token_weight=token_weight, mil_weight=mil_weight, mil_top_k=4, scene_weight=scene_weight)
    patches = token_weight or mil_weight or scene_weight
    return Trainer(_patch_clip(model, "maskclip" if mil_weight or scene_weight else "plain") if patches else model,
                   loss, data, config, tmp_path, collate=collate, progress=False)


def test_clip_contrastive_loss_falls(tmp_path):
    trainer = _tiny_clip_trainer(tmp_path, steps=30)
    trainer.fit()
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_the_close_up_token_term_is_its_formula_and_falls(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit", pretrained=None).eval()
    patch_clip = _patch_clip(model)
    texts = ["a photo of a red star.", "sand", "a photo of a star.", "a photo of a blue star."]
    images = torch.randn(4, 3, 64, 64)
    tokens = open_clip.get_tokenizer("tiny-vit")(texts)
    image, text, scale, patches = patch_clip(images, tokens)
    reference = model(images, tokens)
    for mine, theirs in zip((image, text, scale), reference):
        assert torch.allclose(mine, theirs, atol=1e-6)
    visual = model.visual  # the plain readout: open_clip's own last tokens
    assert torch.allclose(patches, visual._pool(visual.transformer(visual._embeds(images)))[1] @ visual.proj, atol=1e-6)
    targets = torch.zeros(4, 64, 64, dtype=torch.bool)
    targets[0, 19:38, 13:51] = True  # a 4x4 grid: patch centres at pixels 8, 24, 40, 56
    targets[3, :32, :32] = True
    star, red, blue = 11, 0, 4  # world.classes, COLOURS
    subjects = torch.tensor([[star, red, red], [-1, -1, -1], [star, blue, -1], [star, blue, blue]])
    assert true_of(subjects).nonzero().tolist() == [[0, 0], [0, 2], [2, 2], [2, 3], [3, 2], [3, 3]]
    plain = clip_loss(model, (images, tokens, targets, subjects))["loss"]
    values = clip_loss(patch_clip, (images, tokens, targets, subjects), token_weight=0.5)
    assert torch.allclose(values["clip_loss"], plain, atol=1e-6)
    inside = patch_targets(targets[[0, 3]], 4).view(2, 4, 4)
    assert inside[0].nonzero().tolist() == [[1, 1], [1, 2]] and inside[1].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    terms = []
    for item, mask in zip((0, 3), inside):
        for token in patches[item][mask.flatten()]:
            logits = scale * F.normalize(token, dim=-1) @ text.T
            twins = [2]  # "a photo of a star." is true of both stars
            logits[twins] = float("-inf")
            terms.append(F.cross_entropy(logits[None], torch.tensor([item])))
    assert len(terms) == 6
    assert torch.allclose(values["token_loss"], torch.stack(terms).mean(), atol=1e-5)
    assert torch.allclose(values["loss"], plain + 0.5 * values["token_loss"], atol=1e-5)
    masked = clip_loss(model, (images, tokens, targets, subjects), mask_true_captions=True)["loss"]
    logits = scale * image @ text.T
    leave_out = true_of(subjects) & ~torch.eye(4, dtype=torch.bool)  # captions 0-3 differ in text
    labels = torch.arange(4)
    by_image = F.cross_entropy(logits.masked_fill(leave_out, float("-inf")), labels)
    by_text = F.cross_entropy(logits.T.masked_fill(leave_out.T, float("-inf")), labels)
    assert torch.allclose(masked, (by_image + by_text) / 2, atol=1e-5) and not torch.allclose(masked, plain)
    nobody = torch.full((4, 3), -1)
    assert torch.allclose(clip_loss(model, (images, tokens, targets, nobody), mask_true_captions=True)["loss"], plain,
                          atol=1e-5)  # no repeats: open_clip's loss

    trainer = _tiny_clip_trainer(tmp_path, steps=30, close_ups=0.5, token_weight=1.0, views="anywhere")
    trainer.fit()
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["token_loss"]) for row in csv.DictReader(handle)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_the_caption_level_token_term_is_its_formula_and_falls(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit", pretrained=None).eval()
    patch_clip = _patch_clip(model, "maskclip")
    texts = ["a photo of a red star.", "a red star and sand.", "a photo of a star.", "a photo of grass.",
             "a photo of a blue circle.", "a photo of sand."]
    images = torch.randn(6, 3, 64, 64)
    tokens = open_clip.get_tokenizer("tiny-vit")(texts)
    image, text, scale, patches = patch_clip(images, tokens)
    for mine, theirs in zip((image, text, scale), model(images, tokens)):
        assert torch.allclose(mine, theirs, atol=1e-6)
    dense = patch_clip.backbone.dense_features(images, "maskclip").features  # (6, D, 4, 4)
    assert torch.allclose(patches, dense.flatten(2).transpose(1, 2), atol=1e-5)  # the readout the demo uses
    star, circle, red, blue, grass, sand = 11, 8, 0, 4, 1, 3  # world.classes, COLOURS
    # a red star (novel or not: no pixel is marked), a whole scene, a blue star said as "a star", a grass close-up,
    # a blue circle, a sand close-up
    subjects = torch.tensor([[star, red, red], [-1, -1, -1], [star, blue, -1], [grass, -1, -1], [circle, blue, blue],
                             [sand, -1, -1]])
    targets = torch.zeros(6, 64, 64, dtype=torch.bool)
    values = clip_loss(patch_clip, (images, tokens, targets, subjects), mil_weight=0.5, mil_top_k=3)
    # each close-up against the captions of its kind's close-ups that are not true of it (scene captions never)
    against = {0: [0, 4], 2: [0, 2, 4], 3: [3, 5], 4: [0, 2, 4], 5: [3, 5]}
    terms = []
    for item, columns in against.items():
        units = F.normalize(patches[item], dim=-1)  # (16, D)
        logits = torch.stack([(scale * units @ text[j]).sort(descending=True).values[:3].mean() for j in columns])
        terms.append(F.cross_entropy(logits[None], torch.tensor([columns.index(item)])))
    assert torch.allclose(values["mil_loss"], torch.stack(terms).mean(), atol=1e-5)
    assert torch.allclose(values["loss"], values["clip_loss"] + 0.5 * values["mil_loss"], atol=1e-5)
    assert "token_loss" not in values  # no pixel is marked
    targets[0, :32] = targets[3] = True
    both = clip_loss(patch_clip, (images, tokens, targets, subjects), token_weight=2.0, mil_weight=0.5, mil_top_k=3)
    assert torch.allclose(both["mil_loss"], values["mil_loss"], atol=1e-6)  # pixel targets do not touch it
    assert torch.allclose(both["loss"], both["clip_loss"] + 2.0 * both["token_loss"] + 0.5 * both["mil_loss"],
                          atol=1e-5)
    assert torch.allclose(top_k_caption_logits(F.normalize(patches, dim=-1), text, scale, 16),
                          scale * (F.normalize(patches, dim=-1) @ text.T).mean(dim=1), atol=1e-5)  # k = all: mean

    trainer = _tiny_clip_trainer(tmp_path, steps=30, close_ups=0.5, mil_weight=1.0, views="anywhere")
    trainer.fit()
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["mil_loss"]) for row in csv.DictReader(handle)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_the_scene_level_term_is_its_formula_and_falls(tmp_path):
    torch.manual_seed(0)
    world = SyntheticWorld(64, seed=0, max_objects=2)
    model = open_clip.create_model("tiny-vit", pretrained=None).eval()
    patch_clip, tokenizer = _patch_clip(model, "maskclip"), open_clip.get_tokenizer("tiny-vit")
    red_star, blue_star, red_heart = (thing_index(world, shape, colour)
                                      for shape, colour in (("star", "red"), ("star", "blue"), ("heart", "red")))
    # three whole scenes and a close-up; scene 0 names a red star and a red heart, scene 1 a red heart, scene 2 a
    # blue star and a red star
    named = torch.zeros(4, len(world.classes) * len(COLOURS), dtype=torch.int8)
    named[0, [red_star, red_heart]] = torch.tensor([2, 1], dtype=torch.int8)
    named[1, red_heart] = named[2, blue_star] = 2
    named[2, red_star] = 1
    items = [(torch.randn(3, 64, 64), text, torch.zeros(64, 64, dtype=torch.bool), torch.tensor(subject), mark)
             for text, subject, mark in zip(("a red star and a red heart", "a red heart on sand", "a blue star",
                                             "a photo of grass."), ([-1] * 3, [-1] * 3, [-1] * 3, [1, -1, -1]), named)]
    batch = caption_batch(items, tokenizer, world, phrases=True)
    assert batch[5].tolist() == sorted([red_star, blue_star, red_heart])
    assert tokenizer.decode(batch[6][0].tolist()).startswith("<start_of_text>a photo of a red star .")
    values = clip_loss(patch_clip, batch, mil_top_k=3, scene_weight=0.5)
    _, text, scale, patches = patch_clip(batch[0], torch.cat([batch[1], batch[6]]))
    phrases = text[4:]  # red star, blue star, red heart (thing_index order)
    against = {0: ([0, 1], 0), 1: ([0, 1, 2], 2), 2: ([1, 2], 0)}  # what each scene names is no negative of it
    terms = []
    for item, (columns, target) in against.items():
        units = F.normalize(patches[item], dim=-1)  # (16, D)
        logits = torch.stack([(scale * units @ phrases[j]).sort(descending=True).values[:3].mean() for j in columns])
        terms.append(F.cross_entropy(logits[None], torch.tensor([target])))
    assert torch.allclose(values["scene_loss"], torch.stack(terms).mean(), atol=1e-5)
    assert torch.allclose(values["loss"], values["clip_loss"] + 0.5 * values["scene_loss"], atol=1e-5)
    plain = clip_loss(patch_clip, batch[:4])  # the phrases are no captions of the contrastive term
    assert torch.allclose(values["clip_loss"], plain["loss"], atol=1e-5)
    with pytest.raises(ValueError, match="caption_batch"):
        clip_loss(patch_clip, batch[:5], scene_weight=0.5)

    trainer = _tiny_clip_trainer(tmp_path, steps=30, close_ups=0.3, scene_weight=1.0)
    trainer.fit()
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["scene_loss"]) for row in csv.DictReader(handle)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_close_ups_mark_base_things_and_stuff_never_novel_things():
    world = SyntheticWorld(64, seed=0, max_objects=2)
    novel = {f" {name}." for name in world.novel}
    for views in ("centred", "anywhere"):
        data = SyntheticCaptions(world, scenes=8, captions_per_scene=2, close_ups=1.0, views=views, image_size=64)
        for index in range(16):
            image, caption, target, (shown, paint, said), named = data[index]
            assert not named.any()  # the scene-level term is for whole scenes
            assert caption.startswith("a photo of") and image.shape == (3, 64, 64) and target.shape == (64, 64)
            assert target.any() != any(caption.endswith(name) for name in novel), caption  # captions only for novel
            assert caption.endswith(f"{list(COLOURS)[said]} {world.classes[shown]}.") and said == paint
    anywhere = SyntheticCaptions(world, 8, 2, close_ups=1.0, views="anywhere")
    places = {tuple(anywhere[i][2].nonzero().float().mean(dim=0).round().tolist())
              for i in range(16) if anywhere[i][2].any()}
    assert len(places) > 6  # the thing is not always at the same place
    sides = {}  # the thing's longer side / the window's side, at two fills
    for fill in ((0.25, 0.3), (0.8, 0.9)):
        views = SyntheticCaptions(world, 8, 2, close_ups=1.0, views="anywhere", fill=fill)
        sides[fill] = [max(float(axis.max() - axis.min() + 1) for axis in target.nonzero().T) / target.shape[0]
                       for _, _, target, _, _ in (views[i] for i in range(16)) if target.any()]
    # the small fill is held unless the window would outgrow the image (things fill 28-52% of the scene)
    assert max(sides[0.25, 0.3]) < 0.5 and all(0.75 <= side <= 0.95 for side in sides[0.8, 0.9]), sides
    stuff = SyntheticCaptions(world, 8, 2, close_ups=1.0, stuff_close_ups=1.0, image_size=64)
    for index in range(16):
        image, caption, target, subject, _ = stuff[index]
        name = caption[len("a photo of "):-1]
        assert name in world.stuff and target.float().mean() > 0.3, (caption, target.float().mean())
        assert subject.tolist() == [world.classes.index(name), -1, -1]
    shapes = SyntheticCaptions(world, 8, 2, close_ups=1.0, shape_captions=1.0)
    for index in range(16):
        image, caption, target, (shown, paint, said), _ = shapes[index]
        assert caption.endswith(f" {world.classes[shown]}.") and len(caption.split()) == 5 and paint >= 0 > said
    image, caption, target, subject, _ = SyntheticCaptions(world, 8, 2, close_ups=0.0)[0]
    assert not target.any() and not caption.startswith("a photo of") and subject.tolist() == [-1, -1, -1]


def test_whole_scenes_name_one_thing_of_their_caption_for_the_scene_level_term():
    world = SyntheticWorld(64, seed=0, max_objects=3)
    data = SyntheticCaptions(world, scenes=12, captions_per_scene=2)
    chosen = set()
    for index in range(24):
        image, caption, target, subject, named = data[index]
        scene = world.scene(scene_index("train", index // 2))
        said = {thing_index(world, p.category, scene.objects[p.objects[0]].colour)
                for c in scene.captions for p in c.phrases if p.objects}  # what the scene's captions name
        assert said <= {thing_index(world, o.category, o.colour) for o in scene.objects}
        wanted = named.eq(2).nonzero().flatten().tolist()
        assert len(wanted) == 1 and set(named.nonzero().flatten().tolist()) == said, (caption, named.nonzero())
        category, colour = divmod(wanted[0], len(COLOURS))
        name = f"{list(COLOURS)[colour]} {world.classes[category]}"
        assert name in caption and phrase_text(world, wanted[0]) in (f"a photo of a {name}.", f"a photo of an {name}.")
        chosen.add(world.classes[category])
    assert chosen & set(world.novel) and len(chosen) > 4  # novel things too; not always the same thing


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


# ------------------------------------------------------------------------------ settings, checkpoints, files
def _linear_trainer(out, steps=4, run=None, fail_at=None, **config):
    """A 2 -> 1 linear model on 8 fixed points: a Trainer that runs in milliseconds."""
    with seeded(0):
        model = torch.nn.Linear(2, 1)
    data = torch.arange(16, dtype=torch.float32).view(8, 2) / 16

    def loss_fn(wrapped, batch):
        if fail_at is not None and trainer.step == fail_at:
            raise KeyboardInterrupt("killed")
        return {"loss": wrapped(batch).pow(2).mean()}

    settings = dict(steps=steps, batch_size=4, lr=0.1, warmup_steps=0, log_every=1, checkpoint_every=2)
    trainer = Trainer(model, loss_fn, data, TrainConfig(**{**settings, **config}), out, progress=False,
                      run=run or {"method": "clip", "recipe": "a.yaml", "model": {"model": "linear"}})
    return trainer


def test_sgd_with_momentum_learns_and_resumes_exactly(tmp_path):
    straight = _linear_trainer(tmp_path / "a", steps=6, optimizer="sgd")
    straight.fit()
    assert isinstance(straight.optimizer, torch.optim.SGD) and straight.optimizer.defaults["momentum"] == 0.9
    with open(tmp_path / "a" / "metrics.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]
    killed = _linear_trainer(tmp_path / "b", steps=6, optimizer="sgd")
    killed.fit(max_steps=2)
    resumed = _linear_trainer(tmp_path / "b", steps=6, optimizer="sgd")
    resumed.fit()  # the momentum buffers come back with the checkpoint
    torch.testing.assert_close(straight.model.weight, resumed.model.weight)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_only_where_bfloat16_is_native(tmp_path, monkeypatch, caplog, native):
    monkeypatch.setattr(trainer_module, "native_cpu_bfloat16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="ovdense"):
        trainer = _linear_trainer(tmp_path, steps=2, amp=True)
    assert trainer.amp is native and ("no native bfloat16" in caplog.text) is not native
    dtypes = []
    trainer.loss_fn = lambda wrapped, batch: (dtypes.append(wrapped(batch).dtype)
                                              or {"loss": wrapped(batch).float().pow(2).mean()})
    trainer.fit()
    assert set(dtypes) == {torch.bfloat16 if native else torch.float32}


@pytest.mark.parametrize("values, key", [
    ({"steps": 0}, "steps"), ({"steps": "ten"}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 6, "accumulate": 4}, "batch_size"),
    ({"accumulate": 0}, "accumulate"), ({"lr": -1e-3}, "lr"), ({"lr": 0}, "lr"), ({"lr": "1e-4"}, "lr"),
    ({"weight_decay": -1}, "weight_decay"), ({"warmup_steps": -1}, "warmup_steps"), ({"schedule": "linear"}, "schedule"),
    ({"log_every": 0}, "log_every"), ({"checkpoint_every": 0}, "checkpoint_every"), ({"amp": "yes"}, "amp"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip_type": "norm"}, "grad_clip_type"),
    ({"optimizer": "adam"}, "optimizer"), ({"lr_mult": {"backbone": -0.1}}, "lr_mult.backbone"),
    ({"lr_mult": [0.1]}, "lr_mult"), ({"seed": -1}, "seed"), ({"num_workers": -2}, "num_workers")])
def test_train_settings_are_checked_by_name(values, key):
    with pytest.raises(InputError, match=rf"^{key}: "):
        TrainConfig(**values)
    with pytest.raises(InputError, match="stesp: unknown key.*did you mean `steps`"):
        TrainConfig.from_dict({"stesp": 3})
    assert TrainConfig(steps=1, batch_size=6, accumulate=3, lr=1, grad_clip=None, schedule="poly").steps == 1


@pytest.mark.parametrize("kind", ["total", "per-parameter"])
def test_gradient_clipping_total_or_per_parameter(kind):
    big, small, unused = (torch.nn.Parameter(torch.zeros(4)) for _ in range(3))
    big.grad, small.grad = torch.full((4,), 3.0), torch.full((4,), 0.5)  # norms 6 and 1; total sqrt(37)
    clip_gradients([big, small, unused], 2.0, kind)
    if kind == "total":  # one factor 2 / sqrt(37) for all
        assert torch.allclose(big.grad, torch.full((4,), 6 / 37 ** 0.5)) and torch.allclose(small.grad, torch.full((4,), 1 / 37 ** 0.5))
    else:  # each on its own: big to norm 2, small (norm 1) untouched
        assert torch.allclose(big.grad, torch.full((4,), 1.0)) and torch.equal(small.grad, torch.full((4,), 0.5))
    assert unused.grad is None


def test_a_checkpoint_of_another_method_or_model_is_refused(tmp_path):
    _linear_trainer(tmp_path, steps=2).fit()
    other = _linear_trainer(tmp_path, run={"method": "tcl", "model": {"model": "linear"}})
    with pytest.raises(CheckpointError, match=r"last\.pt is a checkpoint of `ovdense train clip` \(recipe a\.yaml\), "
                                              r"not of `ovdense train tcl`.*--restart.*--output"):
        other.fit()
    with pytest.raises(CheckpointError, match="last.pt is a checkpoint of `ovdense train clip`"):
        check_resume(tmp_path, "denseclip")
    check_resume(tmp_path, "clip")
    changed = _linear_trainer(tmp_path, run={"method": "clip", "model": {"model": "other"}})
    with pytest.raises(CheckpointError, match="another model.*'linear' there, 'other' now"):
        changed.fit()
    resumed = _linear_trainer(tmp_path, steps=3)
    resumed.fit()
    assert resumed.step == 3 and resumed.finished


def test_unreadable_checkpoints_are_checkpoint_errors(tmp_path):
    good = _linear_trainer(tmp_path / "good", steps=2)
    good.fit()
    data = (tmp_path / "good" / "last.pt").read_bytes()
    damaged = {"empty": b"", "garbage": b"not a checkpoint at all\n" * 10, "truncated": data[:len(data) // 2]}
    for name, content in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    for name in ("list", "partial"):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.pt").rename(tmp_path / name / "last.pt")
    for name in (*damaged, "list", "partial"):
        with pytest.raises(CheckpointError, match=rf"{name}/last\.pt .*--restart") as error:
            _linear_trainer(tmp_path / name).fit()
        assert type(error.value) is CheckpointError, name
        with pytest.raises(CheckpointError):
            check_resume(tmp_path / name, "clip")
        assert (tmp_path / name / "last.pt").is_file()  # left for the user to inspect
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)


def test_restart_replaces_the_old_checkpoint_only_once_a_new_one_is_written(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"the old run's checkpoint")
    killed = _linear_trainer(tmp_path, steps=4, fail_at=1)  # dies before its first checkpoint (step 2)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(resume=False)
    assert (tmp_path / "last.pt").read_bytes() == b"the old run's checkpoint"
    restarted = _linear_trainer(tmp_path, steps=4)
    restarted.fit(resume=False)
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o644
        _linear_trainer(tmp_path / "run", steps=2).fit()
        for name in ("last.pt", "metrics.csv"):
            assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == 0o644
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.txt", "x")
        assert stat.S_IMODE(os.stat(tmp_path / "private.txt").st_mode) == 0o600
        os.chmod(tmp_path / "new.txt", 0o640)  # a file that is replaced keeps its mode
        write_text_atomic(tmp_path / "new.txt", "y")
        assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o640
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError):  # on error the target is untouched and the temporary file removed
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "new.txt").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "private.txt", "run"]


def test_nothing_is_written_inside_the_installed_package(tmp_path):
    target = PACKAGE_DIR / "weights" / "should-never-exist.safetensors"
    with pytest.raises(InputError, match="inside the installed ovdense package"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
    assert not target.exists()
    assert inside_package(PACKAGE_DIR / "weights" / ".." / "x") and not inside_package(tmp_path / "ovdense")


def test_seeded_builds_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(0):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    with seeded(0):
        b = torch.nn.Linear(4, 4).weight.detach().clone()
    with seeded(1):
        c = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(3), expected)
