"""The cached-row guard both vLLM backends share (backends/prefix_cache.py)."""

from __future__ import annotations

import math

import pytest

from stepcredit.backends.base import BackendError
from stepcredit.backends.prefix_cache import UnreadableRows, read_probe, reference_logprobs, rows_trusted


@pytest.mark.parametrize(
    ("cached", "context_len", "read_cache", "trusted"),
    [
        (0, 10, True, True),
        (9, 10, True, True),  # row 10 comes from position 9, which was computed
        (10, 10, True, False),  # position 9 came from the cache: row 10 is garbage
        (14, 10, True, False),  # the same probe scored twice: the whole prompt was cached
        (None, 10, True, False),  # no count: cannot tell
        (14, 10, False, True),  # no cache reads asked for: rows are computed
        (None, 10, False, True),
    ],
)
def test_rows_trusted(cached, context_len, read_cache, trusted):
    assert rows_trusted(cached, context_len, read_cache) is trusted


class Fetch:
    """Answers in turn; records whether each request read the cache."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls: list[bool] = []

    async def __call__(self, read_cache: bool):
        self.calls.append(read_cache)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_trusted_cache_read_is_used_as_is():
    fetch = Fetch((["rows"], 9))
    probe = await read_probe(fetch, 10, read_cache=True)
    assert fetch.calls == [True]
    assert (probe.rows, probe.cached_tokens, probe.resubmitted) == (["rows"], 9, False)


@pytest.mark.parametrize("first", [(["garbage"], 12), (["garbage"], None), UnreadableRows("not JSON compliant")])
async def test_an_untrusted_cache_read_is_sent_again_without_cache_reads(first):
    fetch = Fetch(first, (["computed"], 0))
    probe = await read_probe(fetch, 10, read_cache=True)
    assert fetch.calls == [True, False]
    assert (probe.rows, probe.cached_tokens, probe.resubmitted) == (["computed"], 0, True)


async def test_without_reuse_one_request_that_reads_no_cache():
    fetch = Fetch((["computed"], None))
    probe = await read_probe(fetch, 10, read_cache=False)
    assert fetch.calls == [False]
    assert (probe.cached_tokens, probe.resubmitted) == (0, False)


async def test_unreadable_rows_without_cache_reads_is_not_swallowed():
    fetch = Fetch(UnreadableRows("still"))
    with pytest.raises(UnreadableRows):
        await read_probe(fetch, 10, read_cache=False)


def lookup(row, token):
    return row.get(token)


def test_reference_logprobs_reads_the_reference_rows():
    rows = [None, {5: -9.0}, {7: -0.5}, {8: -0.25}]
    assert reference_logprobs(rows, 2, [7, 8], lookup) == [-0.5, -0.25]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([None, {5: -1.0}, None], "no logprob for reference token 7 at position 2"),
        ([None, {5: -1.0}, {6: -1.0}], "no logprob for reference token 7"),
        ([None, {5: -1.0}], "no logprob for reference token 7"),  # fewer rows than the prompt
        ([None, {5: -1.0}, {7: math.nan}], "non-finite"),
        ([None, {5: -1.0}, {7: -math.inf}], "non-finite"),
    ],
)
def test_a_missing_or_non_finite_row_is_an_error_not_a_number(rows, message):
    with pytest.raises(BackendError, match=message):
        reference_logprobs(rows, 2, [7], lookup)


class FakeOutput:
    def __init__(self, prompt: list[int], cached: int, garbage: bool) -> None:
        self.num_cached_tokens = cached
        value = math.nan if garbage else -0.5
        self.prompt_logprobs = [None] + [{t: type("Logprob", (), {"logprob": value})()} for t in prompt[1:]]


class FakeEngine:
    """AsyncLLM stand-in: a cache-reading request hits the whole prompt (garbage rows)."""

    errored = False

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def generate(self, prompt, params, request_id):
        self.requests.append(params)
        ids = prompt["prompt_token_ids"]
        reads = params == "read-cache"
        yield FakeOutput(ids, len(ids) if reads else 0, garbage=reads)


async def test_in_process_backend_resubmits_through_the_shared_guard():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from stepcredit.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend.__new__(VLLMBackend)  # the engine replaced: no model load
    backend.engine = FakeEngine()
    backend.prefix_reuse = True
    backend._read_cache, backend._no_cache = "read-cache", "no-cache"
    backend.resubmissions = 0
    mean, computed = await backend._score([1, 2, 3, 4], [5, 6])
    assert backend.engine.requests == ["read-cache", "no-cache"]
    assert (mean, computed, backend.resubmissions) == (-0.5, 6, 1)
