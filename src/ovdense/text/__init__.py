"""Prompt templates, vocabularies with synonyms and background, and the text-embedding cache."""
from .cache import DEFAULT_CACHE, TextEmbeddingCache
from .vocabulary import BACKGROUND, TEMPLATE_SETS, ClassSpec, Vocabulary, resolve_templates

__all__ = ["DEFAULT_CACHE", "TextEmbeddingCache", "BACKGROUND", "TEMPLATE_SETS", "ClassSpec", "Vocabulary",
           "resolve_templates"]
