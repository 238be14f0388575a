"""The one cache key: every cache of the kit names its folders with `cache_key`.

    cache_key(kind, version, params) -> 10 hex digits of sha256({"kind", "version", "params"})

`kind` is the cache (``masks``, ``tiles``, ``fields``, ``predict``), `version` the format version
of its entries, kept beside the code that writes them (`kit.segment.cache.MASK_CACHE_VERSION`,
`kit.cells.TILE_CACHE_VERSION`, `kit.fields.FIELD_CACHE_VERSION`, `kit.predict.PREDICT_CACHE_VERSION`):
bump it whenever that code would write different bytes for the same inputs, and old entries are
never reused. `params` is everything else the entries depend on (JSON-serialisable; key order
does not matter).
"""
from __future__ import annotations

import hashlib
import json

__all__ = ["cache_key"]


def cache_key(kind: str, version: int, params: dict) -> str:
    """Short, stable digest of (kind, version, params): the folder key of one cache's settings."""
    blob = json.dumps({"kind": kind, "version": int(version), "params": params}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
