"""Vocabularies, templates and the text-embedding cache."""
import logging
import multiprocessing
import os
import sqlite3
import zlib
from contextlib import closing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import load_clip
from ovdense.data import builtin_vocabulary
from ovdense.text import TEMPLATE_SETS, TextEmbeddingCache, Vocabulary, resolve_templates
from ovdense.text.cache import DB_NAME, DEFAULT_CACHE, default_cache_dir, disable_disk_cache


def test_parse_classes_and_synonyms():
    vocab = Vocabulary.parse("cat, dog; puppy;  hound , grass")
    assert vocab.names == ["cat", "dog", "grass"]
    assert vocab.queries == ["cat", "dog", "puppy", "hound", "grass"]
    assert vocab.query_to_class == [0, 1, 1, 1, 2]
    assert vocab.background is None


def test_display_names_and_background():
    vocab = Vocabulary.coerce(["background: sky; wall", "person; man; woman"])
    assert vocab.names == ["background", "person"] and vocab.background == 0
    assert vocab.queries == ["sky", "wall", "person", "man", "woman"]
    virtual = Vocabulary.parse("cat, dog").with_background()
    assert virtual.names == ["background", "cat", "dog"] and virtual.background == 0
    assert virtual.queries == ["cat", "dog"]  # the threshold background has no text query


@pytest.mark.parametrize("text,message", [("", "empty"), (" , ,", "empty"), ("cat, dog, Cat", "more than once")])
def test_bad_vocabularies_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.parse(text)


def test_builtin_dataset_vocabularies():
    sizes = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_stuff171": 171,
             "coco_object": 81, "ade150": 150, "cityscapes": 19}
    for name, size in sizes.items():
        assert len(builtin_vocabulary(name)) == size, name
    voc = builtin_vocabulary("voc21")
    assert voc.background == 0 and voc.names[15] == "person" and "sky" in voc.classes[0].synonyms


def test_templates():
    assert len(TEMPLATE_SETS["imagenet80"]) == 80
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates(["itap of a {}."]) == ("itap of a {}.",)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no slot"])
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("imagenet81")


def test_overlong_prompt_is_an_error(tiny_vit):
    with pytest.raises(ValueError, match="tokens long"):
        tiny_vit.encode_text(["word " * 100])


class CountingBackbone:
    """Wraps a backbone and counts the prompts sent to its text encoder."""

    def __init__(self, backbone):
        self.backbone, self.name, self.text_fingerprint = backbone, backbone.name, backbone.text_fingerprint
        self.prompts = []

    def encode_text(self, prompts):
        self.prompts.extend(prompts)
        return self.backbone.encode_text(prompts)


def test_cache_embeds_each_name_once_and_matches_direct_computation(tiny_vit):
    counting = CountingBackbone(tiny_vit)
    cache = TextEmbeddingCache()
    templates = ("a photo of a {}.", "art of the {}.")
    first = cache.embed(counting, ["cat", "dog"], templates)
    assert len(counting.prompts) == 4
    again = cache.embed(counting, ["dog", "cat", "cat"], templates)
    assert len(counting.prompts) == 4  # the text encoder did not run again
    torch.testing.assert_close(again, first[[1, 0, 0]])
    cache.embed(counting, ["cat", "bird"], templates)
    assert counting.prompts[4:] == ["a photo of a bird.", "art of the bird."]  # only the new name
    cache.embed(counting, ["cat"], ("a {}.",))
    assert len(counting.prompts) == 7  # other templates are another key

    with torch.no_grad():
        direct = F.normalize(tiny_vit.encode_text([t.format("cat") for t in templates]), dim=-1).mean(0)
    torch.testing.assert_close(first[0], F.normalize(direct, dim=0))
    assert torch.allclose(first.norm(dim=-1), torch.ones(2))


def test_cache_evicts_least_recently_used(tiny_vit):
    cache = TextEmbeddingCache(max_entries=2)
    cache.embed(tiny_vit, ["a", "b"], ("{}",))
    cache.embed(tiny_vit, ["a"], ("{}",))
    cache.embed(tiny_vit, ["c"], ("{}",))
    assert [key[-1] for key in cache._entries] == ["a", "c"]


# ------------------------------------------------------------------------------ the on-disk layer
def test_disk_cache_is_shared_by_fresh_caches(tiny_vit, tmp_path):
    templates = ("a photo of a {}.", "art of the {}.")
    first = CountingBackbone(tiny_vit)
    stored = TextEmbeddingCache(disk=tmp_path).embed(first, ["cat", "dog"], templates)
    assert len(first.prompts) == 4 and (tmp_path / DB_NAME).is_file()
    assert torch.equal(stored, TextEmbeddingCache().embed(tiny_vit, ["cat", "dog"], templates))  # memory only

    second = CountingBackbone(tiny_vit)
    cache = TextEmbeddingCache(disk=tmp_path)  # fresh memory, same folder: another process, say
    again = cache.embed(second, ["dog", "cat", "dog"], templates)
    assert second.prompts == [] and torch.equal(again, stored[[1, 0, 1]])  # bit-identical, no encoding
    cache.clear()
    cache.embed(second, ["cat", "bird"], templates)
    assert second.prompts == ["a photo of a bird.", "art of the bird."]  # only the name not on disk

    cache.clear()
    cache.clear_disk()
    assert not (tmp_path / DB_NAME).exists()
    cache.embed(second, ["cat"], templates)
    assert len(second.prompts) == 4


def test_disk_cache_keys_text_weights_and_templates(tiny_vit, tmp_path):
    other_seed, same_weights = load_clip("tiny-vit", "random:1"), load_clip("tiny-vit", "random")
    assert other_seed.text_fingerprint != tiny_vit.text_fingerprint == same_weights.text_fingerprint
    stored = TextEmbeddingCache(disk=tmp_path).embed(tiny_vit, ["cat"], ("a {}.",))
    for backbone, templates, on_disk in [(same_weights, ("a {}.",), True), (tiny_vit, ("the {}.",), False),
                                         (tiny_vit, ("a {}.", "the {}."), False), (other_seed, ("a {}.",), False)]:
        counting = CountingBackbone(backbone)
        out = TextEmbeddingCache(disk=tmp_path).embed(counting, ["cat"], templates)
        assert (counting.prompts == []) == on_disk and torch.equal(out, stored) == on_disk


def test_text_fingerprint_follows_the_text_weights_only(tiny_model_configs):
    backbone = load_clip("tiny-vit", "random")
    before = backbone.text_fingerprint
    assert len(before) == 64 and backbone.text_fingerprint == before
    with torch.no_grad():
        backbone.model.visual.conv1.weight.add_(1)
    assert backbone.text_fingerprint == before
    for change in (backbone.model.ln_final.bias, backbone.model.token_embedding.weight):  # whole, sampled
        with torch.no_grad():
            change.add_(1)
        assert backbone.text_fingerprint != before
        before = backbone.text_fingerprint


def test_disk_cache_evicts_least_recently_used_over_its_size_cap(tiny_vit, tmp_path):
    def cache():
        return TextEmbeddingCache(disk=tmp_path, max_disk_bytes=3 * 4 * tiny_vit.embed_dim)  # 3 float32 embeddings
    cache().embed(tiny_vit, ["a", "b", "c"], ("{}",))
    cache().embed(tiny_vit, ["a"], ("{}",))  # reading from disk is a use
    cache().embed(tiny_vit, ["d"], ("{}",))
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        assert sorted(name for name, in db.execute("SELECT name FROM embeddings")) == ["a", "c", "d"]


@pytest.mark.parametrize("problem", ["corrupt file", "unwritable folder"])
def test_unusable_disk_cache_warns_once_and_keeps_working(tiny_vit, tmp_path, caplog, problem):
    folder = tmp_path
    if problem == "corrupt file":
        (tmp_path / DB_NAME).write_bytes(b"not a database" * 100)
    else:
        (tmp_path / "file").write_text("")
        folder = tmp_path / "file" / "cache"  # cannot be made, even by root
    cache = TextEmbeddingCache(disk=folder)
    with caplog.at_level(logging.WARNING, logger="ovdense"):
        out = cache.embed(tiny_vit, ["cat", "dog"], ("a {}.",))
        cache.embed(tiny_vit, ["bird"], ("a {}.",))
    assert cache.path is None and len(caplog.records) == 1 and "memory only" in caplog.text
    assert torch.equal(out, TextEmbeddingCache().embed(tiny_vit, ["cat", "dog"], ("a {}.",)))


def test_default_cache_location_and_switches(monkeypatch, tmp_path):
    assert DEFAULT_CACHE.path == Path(os.environ["OVDENSE_CACHE_DIR"]) / DB_NAME  # conftest's session folder
    monkeypatch.setattr(DEFAULT_CACHE, "path", DEFAULT_CACHE.path)  # restored after the test
    disable_disk_cache()
    assert DEFAULT_CACHE.path is None

    monkeypatch.delenv("OVDENSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert TextEmbeddingCache(disk=True).path == tmp_path / "xdg" / "ovdense" / DB_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "ovdense"
    monkeypatch.setenv("OVDENSE_NO_CACHE", "1")
    assert TextEmbeddingCache(disk=True).path is None and TextEmbeddingCache().path is None
    assert TextEmbeddingCache(disk=tmp_path).path == tmp_path / DB_NAME  # an explicit folder is still used


class FakeTextTower:
    """A text encoder for worker processes that need no model: (P,) prompts -> (P, 8), each row set by its prompt."""

    name, text_fingerprint = "fake", "0" * 64

    def encode_text(self, prompts):
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])


NAMES, TEMPLATES, CAP = [f"thing {i}" for i in range(40)], ("a {}.", "the {}."), 30 * 4 * 8


def write_concurrently(folder: str, worker: int, start) -> None:
    """From `start` (a barrier), many small transactions on the keys the other worker writes too, with evictions."""
    start.wait(timeout=60)
    for step in range(12):
        names = (NAMES if worker else NAMES[::-1])[3 * step:3 * step + 10]
        cache = TextEmbeddingCache(disk=folder, max_disk_bytes=CAP)
        cache.embed(FakeTextTower(), names, TEMPLATES)
        assert cache.path is not None, "the disk layer failed"


def test_concurrent_processes_leave_a_consistent_db(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    other = spawn.Process(target=write_concurrently, args=(str(tmp_path), 1, start))  # a fresh interpreter
    other.start()
    write_concurrently(str(tmp_path), 0, start)
    other.join(timeout=60)
    assert other.exitcode == 0
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(db.execute("SELECT name, dim FROM embeddings").fetchall())
        assert 0 < len(rows) <= CAP // (4 * 8) and set(rows.values()) == {8}
    stored = TextEmbeddingCache(disk=tmp_path).embed(FakeTextTower(), list(rows), TEMPLATES)
    torch.testing.assert_close(stored, TextEmbeddingCache().embed(FakeTextTower(), list(rows), TEMPLATES))
