"""Text embeddings of class names, averaged over prompt templates, cached in memory and on disk.

The disk layer is one SQLite database, `text_embeddings.sqlite` in a cache directory, shared by every
process using that directory (WAL journal; writers wait for each other). A row holds the embedding of
one name for one (model name, text-tower fingerprint, template set) as a float32 blob; the least
recently used rows go when the blobs pass `max_disk_bytes`. An unusable disk layer (unwritable
directory, corrupt file) logs one warning and leaves that cache in memory only: the cache never fails
a segmentation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("ovdense")

DB_NAME = "text_embeddings.sqlite"
_SETUP_TRIES = 20
_BUSY_TIMEOUT_S = 10.0
_NAMES_PER_QUERY = 900  # below SQLite's oldest limit on query parameters (999)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    model TEXT NOT NULL, text_fingerprint TEXT NOT NULL, templates TEXT NOT NULL, name TEXT NOT NULL,
    dim INTEGER NOT NULL, value BLOB NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (model, text_fingerprint, templates, name));
CREATE INDEX IF NOT EXISTS embeddings_by_use ON embeddings (used);
"""
_MATCH = "model = ? AND text_fingerprint = ? AND templates = ?"
# Deletes the least recently used rows until the values of the others take at most ? bytes.
_EVICT = """
DELETE FROM embeddings WHERE rowid IN (
    SELECT rowid FROM (SELECT rowid, SUM(length(value)) OVER (ORDER BY used, rowid) - length(value) AS older
                       FROM embeddings)
    WHERE older < (SELECT total(length(value)) FROM embeddings) - ?)
"""


def default_cache_dir() -> Path:
    """$OVDENSE_CACHE_DIR, else $XDG_CACHE_HOME/ovdense, else ~/.cache/ovdense."""
    if os.environ.get("OVDENSE_CACHE_DIR"):
        return Path(os.environ["OVDENSE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ovdense"


class TextEmbeddingCache:
    """Per-name embeddings keyed by (model name, text-tower fingerprint, templates, name).

    Lookups go to memory (an LRU of `max_entries`), then to the disk database (one query for every
    name not in memory), then to the text encoder for the rest, which are written to disk in one
    transaction. A name already embedded with the same text weights and templates, in this process or
    in an earlier one sharing the directory, does not run the text encoder; the result is the same
    float32 tensor, bit for bit.

    disk: True: `default_cache_dir()`, or memory only when the environment sets OVDENSE_NO_CACHE=1;
        a directory: the database in it; False: memory only.
    max_disk_bytes: cap on the stored float32 values; the file takes up to ~1.5x that (keys, index, pages
        freed by evictions and reused by later writes).
    path: the database file, None when the cache is in memory only (also after a disk error).
    """

    def __init__(self, max_entries: int = 50_000, batch_size: int = 256, disk: str | Path | bool = False,
                 max_disk_bytes: int = 512 * 2**20):
        self.max_entries = max_entries
        self.batch_size = batch_size
        self.max_disk_bytes = max_disk_bytes
        if disk is True:
            disk = False if os.environ.get("OVDENSE_NO_CACHE", "") not in ("", "0") else default_cache_dir()
        self.path: Path | None = Path(disk).expanduser() / DB_NAME if disk else None
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget the embeddings held in memory; the database keeps its own (see `clear_disk`)."""
        self._entries.clear()

    def clear_disk(self) -> None:
        """Delete the database file and its journal, for every process sharing it (works on a corrupt file)."""
        if self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    @torch.no_grad()
    def embed(self, backbone, names: list[str], templates: tuple[str, ...], raw_mean: bool = False) -> torch.Tensor:
        """(N,) names -> (N, D) unit-norm float32 CPU embeddings: mean over templates of normalised prompt embeddings
        (`raw_mean`: of the prompt embeddings as the text tower gives them, RegionCLIP's concept embeddings).

        backbone: a `CLIPBackbone`, or anything with `name`, `text_fingerprint` and `encode_text(prompts) -> (P, D)`.
        """
        recipe = json.dumps(templates if not raw_mean else {"raw_mean": templates})
        prefix = (backbone.name, backbone.text_fingerprint, hashlib.sha256(recipe.encode()).hexdigest())
        keys = [(*prefix, name) for name in names]
        missing = [key[-1] for key in dict.fromkeys(keys) if key not in self._entries]
        if missing:
            found = self._on_disk(self._load, prefix, missing) or {}
            new = [name for name in missing if name not in found]
            encoded = dict(zip(new, self._encode(backbone, new, templates, raw_mean))) if new else {}
            self._on_disk(self._store, prefix, encoded, list(found))
            for name in missing:
                self._entries[(*prefix, name)] = found[name] if name in found else encoded[name]
        for key in keys:
            self._entries.move_to_end(key)
        out = torch.stack([self._entries[k] for k in keys])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out

    def _encode(self, backbone, names: list[str], templates: tuple[str, ...], raw_mean: bool = False) -> torch.Tensor:
        """(N,) names -> (N, D) float32 CPU embeddings, by the text encoder in batches of `batch_size` prompts."""
        prompts = [t.format(name) for name in names for t in templates]
        encoded = torch.cat([backbone.encode_text(prompts[i:i + self.batch_size]).float()
                             for i in range(0, len(prompts), self.batch_size)])
        encoded = (encoded if raw_mean else F.normalize(encoded, dim=-1)).reshape(len(names), len(templates), -1)
        return F.normalize(encoded.mean(dim=1), dim=-1).cpu()

    # -------------------------------------------------------------------------------- disk layer
    def _on_disk(self, operation, *args):
        """operation(*args) on the database; None without one, or when it fails (then warns once and stops using it)."""
        if self.path is None:
            return None
        try:
            return operation(*args)
        except (sqlite3.Error, OSError) as error:
            logger.warning("text-embedding cache %s is unusable (%s: %s); keeping text embeddings in memory only. "
                           "Delete the file, or set OVDENSE_CACHE_DIR elsewhere or OVDENSE_NO_CACHE=1.",
                           self.path, type(error).__name__, error)
            self.path = None
            return None

    def _connect(self) -> sqlite3.Connection:
        """A connection to the database, created with its settings and schema if new. Processes creating it at the
        same moment can get 'database is locked' at once (switching the journal mode takes no busy wait): retried."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(_SETUP_TRIES):
            db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # a new file: set once, kept in it
                    db.execute("PRAGMA page_size = 16384")  # packs 2-4 KB rows, where 4 KB pages hold one
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash may lose the last writes, not the file
                db.executescript(_SCHEMA)
                return db
            except sqlite3.OperationalError as error:
                db.close()
                if "locked" not in str(error) or attempt == _SETUP_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except sqlite3.Error:
                db.close()
                raise

    def _load(self, prefix: tuple[str, str, str], names: list[str]) -> dict[str, torch.Tensor]:
        """The stored (D,) embeddings of those of `names` that the database holds under `prefix`."""
        found = {}
        with closing(self._connect()) as db:
            for i in range(0, len(names), _NAMES_PER_QUERY):
                chunk = names[i:i + _NAMES_PER_QUERY]
                rows = db.execute(f"SELECT name, value FROM embeddings WHERE {_MATCH} "
                                  f"AND name IN ({', '.join('?' * len(chunk))})", (*prefix, *chunk))
                found.update((name, torch.from_numpy(np.frombuffer(value, "<f4").astype(np.float32)))
                             for name, value in rows)
        return found

    def _store(self, prefix: tuple[str, str, str], new: dict[str, torch.Tensor], used: list[str]) -> None:
        """One transaction: insert the `new` (D,) embeddings, mark the `used` names as just used, evict over the cap."""
        now = time.time()
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(f"UPDATE embeddings SET used = ? WHERE {_MATCH} AND name = ?",
                           [(now, *prefix, name) for name in used])
            db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(*prefix, name, len(e), e.numpy().astype("<f4").tobytes(), now) for name, e in new.items()])
            if new:
                db.execute(_EVICT, (self.max_disk_bytes,))
            db.execute("COMMIT")


DEFAULT_CACHE = TextEmbeddingCache(disk=True)
"""The process-wide cache of `SegmentationPredictor`: memory, and `default_cache_dir()` unless OVDENSE_NO_CACHE=1
(the environment as it is when `ovdense.text` is imported)."""


def disable_disk_cache() -> None:
    """Keep `DEFAULT_CACHE` in memory only for the rest of this process (the CLI's --no-cache)."""
    DEFAULT_CACHE.path = None
