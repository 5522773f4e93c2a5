"""Prefix (prompt) cache: the KV caches of recent requests, reused for the longest common token prefix.

Agents and chat UIs resend the whole conversation every turn. When a request ends, its per-layer
KV cache (prompt and generated tokens) is kept here, keyed by exactly the tokens it holds; a new
prompt then starts from the entry sharing the longest prefix with it, cut to that prefix, and only
the rest is prefilled. Entries live in an LRU bounded by bytes (``max_bytes``; 0 turns the cache
off).

A hit never reuses a cache whose tokens differ: an entry's tokens are checked against the cache's
length when it is stored and against the prompt when it is taken, and a hit stops one token short
of the prompt (that token is fed to get the first logits). Cutting an entry shorter than what it
holds works for plain KV caches (``KVCache``) and for sliding-window caches that have not rotated
yet (``RotatingKVCache`` holding no more than its window); a rotated sliding-window cache is
reused only whole (the prompt extends exactly what it holds). Models with other cache types
(SSM/linear-attention state: ``ArraysCache``; quantized or chunked caches) are not cached at all
(:func:`cacheable`).

On a distributed instance every rank keeps the caches of its own layers under the same keys (the
job's sequence number) and :func:`agree` makes rank 0's choice everyone's: rank 0 looks up the
prompt, every rank checks that it holds that entry, and all reuse it or none does.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

log = logging.getLogger(__name__)

#: the default bound of a process's prefix cache (per Engine, per rank of an instance)
DEFAULT_BYTES = 1 << 30


def cacheable(layers: Sequence[Any]) -> str | None:
    """Why caches like ``layers`` (a fresh per-layer cache of the model) cannot be kept, or None."""
    for c in layers:
        if type(c) not in (KVCache, RotatingKVCache):
            return f"{type(c).__name__} layers cannot be cut to a prefix"
    return None


def _copy(a: mx.array) -> mx.array:
    """A copy with its own buffer (a slice would keep a whole batch's buffer alive)."""
    return mx.array(a)


def _compact(c: Any) -> tuple[Any, bool] | None:
    """A compact copy of one layer's cache (one sequence) and whether it can be cut shorter; None if unusable."""
    kind = type(c)  # compared, not narrowed: these caches' arrays are typed as possibly None
    if c.keys is None:
        return None
    if kind is KVCache:
        new = KVCache()
        new.keys, new.values = _copy(c.keys[..., : c.offset, :]), _copy(c.values[..., : c.offset, :])
        new.offset = c.offset
        return new, True
    if kind is RotatingKVCache:
        new = RotatingKVCache(c.max_size, c.keep)
        if c.offset <= c.max_size and c.keys.shape[2] >= c.offset and c._idx >= c.offset:  # in order, not rotated
            new.keys, new.values = _copy(c.keys[..., : c.offset, :]), _copy(c.values[..., : c.offset, :])
            new.offset = new._idx = c.offset
            return new, True
        new.keys, new.values = _copy(c.keys), _copy(c.values)
        new.offset, new._idx = c.offset, c._idx
        return new, False  # rotated: only whole
    return None


def _cut(c: Any, n: int) -> Any:
    """A new cache object holding the first ``n`` tokens of ``c`` (sharing its arrays: caches never write into
    arrays they did not allocate with room to spare, and these have none)."""
    kind = type(c)  # compared, not narrowed (as in _compact)
    if kind is KVCache:
        new: Any = KVCache()
        new.keys, new.values, new.offset = c.keys[..., :n, :], c.values[..., :n, :], n
        return new
    new = RotatingKVCache(c.max_size, c.keep)  # a rotating cache (cacheable() allows no other)
    if n == c.offset:
        new.keys, new.values, new.offset, new._idx = c.keys, c.values, c.offset, c._idx
    else:
        new.keys, new.values = c.keys[..., :n, :], c.values[..., :n, :]
        new.offset = new._idx = n
    return new


def _offset(c: Any) -> int:
    return int(c.offset)


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 token ids the cache holds, in order
    layers: list  # per-layer compact caches
    nbytes: int
    cuttable: bool  # can be cut to a shorter prefix (else reused only whole)


@dataclass(frozen=True)
class Hit:
    """A usable entry: its key and how many of the prompt's first tokens it covers."""

    key: int
    tokens: int


class PrefixCache:
    """KV caches of finished sequences, LRU, bounded by bytes; one per Engine, one per rank.

    Not thread-safe: the engine thread (or a rank's compute thread) alone uses it.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        #: why this model's caches are not kept (set by :meth:`check`), or None
        self.disabled: str | None = None if max_bytes else "off"
        self.stats = {"hits": 0, "misses": 0, "cached_tokens": 0, "stored": 0, "evicted": 0}

    @property
    def enabled(self) -> bool:
        return self.disabled is None

    def check(self, fresh_layers: Sequence[Any]) -> None:
        """Turn the cache off for a model whose fresh per-layer caches cannot be cut (logged once)."""
        why = cacheable(fresh_layers)
        if why is not None and self.disabled is None:
            log.info("prefix cache off: %s", why)
            self.disabled = why

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[int]:
        """Entry keys, least recently used first."""
        return list(self._entries)

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The entry sharing the longest usable prefix with ``prompt`` (at most all but its last token), or None."""
        if not self.enabled or len(prompt) < 2 or not self._entries:
            return None
        p = np.asarray(prompt, np.int64)
        best: Hit | None = None
        for key, e in self._entries.items():
            m = min(len(e.tokens), len(p) - 1)
            diff = np.flatnonzero(e.tokens[:m] != p[:m])
            n = int(diff[0]) if diff.size else m
            if n < len(e.tokens) and not e.cuttable:
                continue
            if n > 0 and (best is None or n >= best.tokens):  # ties: the most recently used (iterated last)
                best = Hit(key, n)
        return best

    def take(self, hit: Hit, prompt: Sequence[int]) -> list | None:
        """Fresh per-layer caches holding the first ``hit.tokens`` tokens of ``prompt`` (the entry becomes the most
        recently used); None when this cache lacks the entry or its tokens differ from ``prompt``'s."""
        e = self._entries.get(hit.key)
        n = hit.tokens
        if e is None or not 0 < n < len(prompt) or n > len(e.tokens) or (n < len(e.tokens) and not e.cuttable):
            return None
        if not np.array_equal(e.tokens[:n], np.asarray(prompt[:n], np.int64)):
            return None
        self._entries.move_to_end(hit.key)
        return [_cut(c, n) for c in e.layers]

    def count(self, cached: int) -> None:
        """Record one lookup's outcome: ``cached`` prompt tokens reused (0: a miss)."""
        if cached:
            self.stats["hits"] += 1
            self.stats["cached_tokens"] += cached
        elif self.enabled:
            self.stats["misses"] += 1

    def store(self, key: int, tokens: Sequence[int], layers: Sequence[Any]) -> bool:
        """Keep ``layers`` (one sequence's per-layer caches, holding exactly ``tokens``) under ``key``.

        Entries whose tokens are a prefix of ``tokens`` are dropped (this one covers them); nothing is kept
        when an entry already holds ``tokens`` and more, when a layer holds another number of tokens, or
        when the entry alone exceeds the bound. Then the least recently used entries go until the cache
        fits. True when kept.
        """
        if not self.enabled or not layers or not tokens:
            return False
        if any(_offset(c) != len(tokens) for c in layers):
            log.warning("prefix cache: a sequence's caches do not hold its %d tokens: not kept", len(tokens))
            return False
        t = np.asarray(tokens, np.int64)
        for e in self._entries.values():
            if len(e.tokens) >= len(t) and np.array_equal(e.tokens[: len(t)], t):
                return False  # already covered
        compact = [_compact(c) for c in layers]
        if any(c is None for c in compact):
            return False
        pairs = [c for c in compact if c is not None]
        copies = [c for c, _ in pairs]
        nbytes = sum(c.keys.nbytes + c.values.nbytes for c in copies)
        if nbytes > self.max_bytes:
            return False
        mx.eval([[c.keys, c.values] for c in copies])
        cuttable = all(ok for _, ok in pairs)
        for old in [k for k, e in self._entries.items() if len(e.tokens) < len(t) and cuttable]:
            e = self._entries[old]
            if np.array_equal(t[: len(e.tokens)], e.tokens):
                self._drop(old)
        self._entries.pop(key, None)
        self._entries[key] = _Entry(t, copies, nbytes, cuttable)
        self.nbytes += nbytes
        self.stats["stored"] += 1
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats["evicted"] += 1
        return True

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.nbytes -= e.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def summary(self) -> dict[str, Any]:
        """Entries, bytes, bound and counters (for status pages)."""
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "disabled": self.disabled,
            **self.stats,
        }


def agree(cache: PrefixCache, prompt: Sequence[int], rank: int, group: Any) -> tuple[list | None, int]:
    """Every rank of ``group``: the per-layer caches to start ``prompt`` from and the tokens they cover.

    Rank 0 looks the prompt up; one ``all_sum`` tells the others which entry (key) and how many
    tokens; a second one finds whether any rank lacks it (each rank bounds its own cache, so
    evictions differ). Every rank then uses it, or none does (``(None, 0)``). Called by every rank,
    in the same order, for every admitted job, when the instance's cache is on.
    """
    hit = cache.lookup(prompt) if rank == 0 else None
    mine = [hit.key, hit.tokens] if hit is not None else [0, 0]
    proposal = mx.distributed.all_sum(mx.array(mine if rank == 0 else [0, 0], mx.int32), group=group)
    key, n = (int(v) for v in proposal.tolist())  # type: ignore[union-attr]
    if n == 0:
        cache.count(0)
        return None, 0
    layers = cache.take(Hit(key, n), prompt)
    missing = mx.distributed.all_sum(mx.array([0 if layers is not None else 1], mx.int32), group=group)
    if int(missing.item()):  # type: ignore[arg-type]
        cache.count(0)
        return None, 0
    cache.count(n)
    return layers, n


def row_caches(batch_layers: Sequence[Any], row: int) -> list:
    """One row's per-layer caches out of a batch's (``BatchKVCache`` / ``BatchRotatingKVCache``)."""
    return [c.extract(row) for c in batch_layers]
