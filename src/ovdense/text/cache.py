"""Text embeddings of class names, averaged over prompt templates and cached."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F


class TextEmbeddingCache:
    """Per-name embeddings keyed by (model identity, templates, name); least recently used are evicted.

    The second request for a name already embedded with the same model and templates does not
    run the text encoder.
    """

    def __init__(self, max_entries: int = 50_000, batch_size: int = 256):
        self.max_entries = max_entries
        self.batch_size = batch_size
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @torch.no_grad()
    def embed(self, backbone, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
        """(N,) names -> (N, D) unit-norm embeddings: mean over templates of the normalised prompt embeddings."""
        keys = [(backbone.identity, templates, name) for name in names]
        missing = list(dict.fromkeys(k for k in keys if k not in self._entries))
        if missing:
            prompts = [t.format(name) for (_, _, name) in missing for t in templates]
            encoded = torch.cat([backbone.encode_text(prompts[i:i + self.batch_size]).float()
                                 for i in range(0, len(prompts), self.batch_size)])
            encoded = F.normalize(encoded, dim=-1).reshape(len(missing), len(templates), -1)
            for key, embedding in zip(missing, F.normalize(encoded.mean(dim=1), dim=-1).cpu()):
                self._entries[key] = embedding
        for key in keys:
            self._entries.move_to_end(key)
        out = torch.stack([self._entries[k] for k in keys])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out


DEFAULT_CACHE = TextEmbeddingCache()
