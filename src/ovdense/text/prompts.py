"""A grounding prompt: a caption and the phrases in it that boxes are named by (torch-free: the grounding data files
and the detectors both read it)."""
from __future__ import annotations

from dataclasses import dataclass

Span = tuple[int, int]


@dataclass
class GroundingPrompt:
    """caption: the text the model reads; phrases: what each phrase is called (a class name or the caption's words);
    spans: per phrase, its character spans [start, end) in the caption."""

    caption: str
    phrases: list[str]
    spans: list[list[Span]]
