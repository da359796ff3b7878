"""Vocabularies, templates and the text-embedding cache."""
import pytest
import torch
import torch.nn.functional as F

from ovdense.data import builtin_vocabulary
from ovdense.text import TEMPLATE_SETS, TextEmbeddingCache, Vocabulary, resolve_templates


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
        self.backbone, self.identity, self.prompts = backbone, backbone.identity, []

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
    assert len(cache) == 2 and (tiny_vit.identity, ("{}",), "b") not in cache._entries
