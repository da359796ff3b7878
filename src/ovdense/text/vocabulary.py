"""Vocabularies: class names with synonyms, prompt templates, and a background class."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import InputError


@cache
def _imagenet80() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet prompt templates, as open_clip ships them."""
    # Imported at first use: open_clip's package imports transformers and torchvision (seconds).
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


class _TemplateSets(Mapping):
    """Named prompt-template sets; each template has one '{}' for the class name."""

    _SETS = {
        "imagenet80": _imagenet80,
        "single": lambda: ("a photo of a {}.",),
        # RegionCLIP's 81 (clip_prompt_utils.get_prompt_templates): '{}.' and the 80 ImageNet ones
        "regionclip81": lambda: ("{}.",) + _imagenet80(),
        # TCL's evaluation templates ('custom' in kakaobrain/tcl datasets/templates.py)
        "tcl": lambda: ("itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
                        "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of many {}.",
                        "a photo of {}s."),
        "none": lambda: ("{}",),
    }

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._SETS[name]()

    def __iter__(self):
        return iter(self._SETS)

    def __len__(self) -> int:
        return len(self._SETS)


TEMPLATE_SETS = _TemplateSets()

BACKGROUND = "background"


def resolve_templates(templates: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A template-set name or an explicit list -> a tuple of templates, each with one '{}'."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; choose one of {', '.join(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each prompt template needs exactly one '{{}}' for the class name: {bad or 'none given'}")
    return templates


@dataclass(frozen=True)
class ClassSpec:
    """One class: a display name and the names (synonyms) its text queries are made from.

    A class with no synonyms is *virtual*: it has no text embedding and is only assigned by the
    background threshold.
    """

    name: str
    synonyms: tuple[str, ...]

    @classmethod
    def parse(cls, entry: str) -> "ClassSpec":
        """'person; man; woman' -> person with three synonyms; 'background: sky; wall' -> display name 'background'."""
        display, colon, rest = entry.partition(":")
        if not colon:
            display, rest = "", entry
        synonyms = tuple(s.strip() for s in rest.split(";") if s.strip())
        if not synonyms:
            raise ValueError(f"class entry {entry!r} names no class")
        return cls(display.strip() or synonyms[0], synonyms)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes; label i of a prediction is `classes[i]`.

    `background` is the index of the background class (or None); pixels whose best class
    probability is under a background threshold get this label.
    """

    classes: tuple[ClassSpec, ...]
    background: int | None = None

    def __post_init__(self):
        if not self.classes:
            raise ValueError("the vocabulary is empty: give at least one class name")
        names = [c.name.lower() for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"the vocabulary names these classes more than once: {', '.join(duplicates)}")

    @classmethod
    def parse(cls, text: str) -> "Vocabulary":
        """'cat, dog; puppy, grass' -> 3 classes (',' separates classes, ';' separates synonyms)."""
        entries = [e for e in text.split(",") if e.strip()]
        return cls(tuple(ClassSpec.parse(e) for e in entries), background=_background_index(entries))

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        """One class per line (UTF-8, a byte-order mark allowed); synonyms separated by ';' (or ','); 'name: syn;
        syn' sets the display name. Raises InputError naming the file when it cannot be read or parsed."""
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
            lines = [line for line in lines if line and not line.startswith("#")]
            specs = tuple(ClassSpec.parse(line if ";" in line or ":" in line else line.replace(",", ";"))
                          for line in lines)
            return cls(specs, background=_background_index([s.name for s in specs]))
        except (OSError, ValueError) as error:  # missing, a folder, not UTF-8 text, empty, duplicated names
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise InputError(f"class list {path}: {reason}") from error

    @classmethod
    def coerce(cls, vocabulary: "Vocabulary | str | list[str]") -> "Vocabulary":
        """Accept a Vocabulary, a 'cat, dog' string or a list of class entries."""
        if isinstance(vocabulary, Vocabulary):
            return vocabulary
        if isinstance(vocabulary, str):
            return cls.parse(vocabulary)
        specs = tuple(ClassSpec.parse(entry) for entry in vocabulary)
        return cls(specs, background=_background_index([s.name for s in specs]))

    def with_background(self, prompts: tuple[str, ...] = ()) -> "Vocabulary":
        """Make class 0 a background class: by prompt (`prompts` given) or virtual (threshold only)."""
        if self.background is not None:
            return self
        return Vocabulary((ClassSpec(BACKGROUND, tuple(prompts)),) + self.classes, background=0)

    def with_virtual_background(self) -> "Vocabulary":
        """Make the background class virtual (no text query; the threshold alone assigns it), adding it as class 0
        if there is none."""
        if self.background is None:
            return self.with_background()
        classes = list(self.classes)
        classes[self.background] = ClassSpec(classes[self.background].name, ())
        return Vocabulary(tuple(classes), background=self.background)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def queries(self) -> list[str]:
        """Every synonym of every class, in order: the texts that get embeddings."""
        return [s for c in self.classes for s in c.synonyms]

    @property
    def query_to_class(self) -> list[int]:
        """For each entry of `queries`, the index of its class."""
        return [i for i, c in enumerate(self.classes) for _ in c.synonyms]

    def __len__(self) -> int:
        return len(self.classes)


def _background_index(names: list[str]) -> int | None:
    names = [n.split(":")[0].split(";")[0].strip().lower() for n in names]
    return names.index(BACKGROUND) if BACKGROUND in names else None
