"""Steps -> probe token sequences (SPEC section 4). Needs a tokenizer, never a model.

Probe k is the token sequence of `context_k + probe_prefix`; each reference is
tokenized on its own and appended by the backend. The trunk is the tokenization
of the longest context; backends that share work between probes (the packed
strategy, vLLM's prefix cache) branch each probe off the trunk at the longest
common token prefix, so the numbers never depend on that sharing.

Cost model: whatever the backend shares, each of the K + 1 probes scores every
reference token, so an item costs at least (K + 1) x sum of reference tokens
"probe tokens" of model work. Builders check that bound (`max_probe_tokens`) right
after tokenizing the references, before the contexts, and a trajectory longer than
the model's context (`max_context`) fails after one context is tokenized, so an
item that cannot be scored costs neither model time nor much preparation time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "TrajectoryProbes",
    "ProbeImage",
    "ProbeMedia",
    "ProbeError",
    "encode_text",
    "text_probes",
    "ids_probes",
    "check_completion_ids",
    "check_context",
    "check_probe_tokens",
    "token_cover",
]


class ProbeError(ValueError):
    """The item cannot be scored as given (bad ids, no context, too long, ...).
    `code` is the per-item error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, eq=False)
class ProbeImage:
    """One image of a trajectory's prompt, in every form a backend may need."""

    data_uri: str
    """The item's inline image (vllm-remote sends it as a content part)."""
    image: object
    """Decoded, RGB (a PIL image: vLLM's `multi_modal_data`)."""
    digest: str
    """sha256 of the image bytes."""
    grid_thw: tuple[int, int, int]
    """Patch grid from the model's image processor: the prompt holds
    grid_t * grid_h * grid_w / merge^2 pad tokens for this image."""
    pixel_values: object
    """numpy array from the model's image processor (the hf backend encodes it)."""


@dataclass(frozen=True, eq=False)
class ProbeMedia:
    """The images of a trajectory's prompt, in order of their placeholders."""

    images: tuple[ProbeImage, ...]

    @property
    def key(self) -> str:
        """Identity of the images: trajectories may share computed prefixes only when equal."""
        return ",".join(image.digest for image in self.images)


@dataclass(frozen=True)
class TrajectoryProbes:
    trunk: list[int]
    """Tokens of prompt + completion up to the last probe's cut (no probe prefix)."""
    contexts: list[list[int]]
    """K + 1 probe contexts: tokens of context_k + probe_prefix, k = 0..K."""
    references: list[list[int]]
    """Token ids of each reference variant, tokenized alone (no special tokens)."""
    media: ProbeMedia | None = None
    """The prompt's images; their placeholders in `trunk` and `contexts` are already
    expanded to one pad token per merged patch."""

    @property
    def longest_sequence(self) -> int:
        return max(len(c) for c in self.contexts) + max(len(r) for r in self.references)

    @property
    def probe_tokens(self) -> int:
        """Reference tokens the model scores: probes x sum of reference tokens (the cost model)."""
        return len(self.contexts) * sum(len(r) for r in self.references)


def check_probe_tokens(n_probes: int, references: Sequence[Sequence[int]], limit: int) -> None:
    """`limit_exceeded` when n_probes x reference tokens is over `limit` (max_probe_tokens_per_item)."""
    lengths = [len(r) for r in references]
    cost = n_probes * sum(lengths)
    if cost <= limit:
        return
    if len(set(lengths)) == 1:
        refs = f"{len(lengths)} reference{'s' if len(lengths) > 1 else ''} x {lengths[0]} tokens"
    else:
        refs = f"{len(lengths)} references of {' + '.join(map(str, lengths))} tokens"
    raise ProbeError(
        "limit_exceeded",
        f"{n_probes} probes x {refs} = {cost} probe tokens, limit max_probe_tokens_per_item={limit}",
    )


def check_context(tokens: int, max_context: int) -> None:
    if tokens > max_context:
        raise ProbeError("context_too_long", f"the longest probe is {tokens} tokens, the model takes {max_context}")


def _adds_bos(tokenizer, text: str) -> bool:
    # A chat template that already renders the BOS text must not get a second one.
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode_text(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize with the tokenizer's default special tokens (see `_adds_bos`)."""
    if not texts:
        return []
    add = _adds_bos(tokenizer, texts[0])
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add)["input_ids"]]


def encode_references(tokenizer, references: Sequence[str]) -> list[list[int]]:
    ids = [list(r) for r in tokenizer(list(references), add_special_tokens=False)["input_ids"]]
    for j, ref_ids in enumerate(ids):
        if not ref_ids:
            raise ProbeError("empty_reference", f"reference {j} tokenizes to no tokens")
    return ids


def text_probes(
    tokenizer,
    prompt: str,
    completion: str,
    cuts: Sequence[int],
    probe_prefix: str,
    references: Sequence[str],
    *,
    max_probe_tokens: int | None = None,
    max_context: int | None = None,
    media: ProbeMedia | None = None,
) -> TrajectoryProbes:
    """Probes from text: `cuts` are the character offsets b, end_1, .., end_K."""
    refs = encode_references(tokenizer, references)
    if max_probe_tokens is not None:
        check_probe_tokens(len(cuts), refs, max_probe_tokens)
    texts = [prompt + completion[:c] + probe_prefix for c in cuts]
    if max_context is not None:
        # The last context is the longest: 257 contexts of a 60,000-character completion
        # take over a second to tokenize, for an item the model cannot take anyway.
        check_context(len(encode_text(tokenizer, texts[-1:])[0]) + max(map(len, refs)), max_context)
    contexts = encode_text(tokenizer, texts)
    trunk = encode_text(tokenizer, [prompt + completion[: cuts[-1]]])[0]
    return TrajectoryProbes(trunk, contexts, refs, media)


class _Decoder:
    """Prefix decodes of a token list, cached."""

    def __init__(self, tokenizer, ids: Sequence[int]) -> None:
        self.tokenizer, self.ids, self.cache = tokenizer, list(ids), {}

    def prefix(self, j: int) -> str:
        if j not in self.cache:
            self.cache[j] = self.tokenizer.decode(
                self.ids[:j], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return self.cache[j]


def token_cover(decoder: _Decoder, text: str, chars: int, guess: int) -> int:
    """Fewest leading tokens whose decode reproduces text[:chars] exactly.

    The predicate is monotone in the token count, so a bracketed binary search
    around `guess` (from per-token lengths) needs only a few full decodes.
    """
    n = len(decoder.ids)
    want = text[:chars]

    def covers(j: int) -> bool:
        got = decoder.prefix(j)
        return len(got) >= chars and got[:chars] == want

    lo, hi, step = max(0, guess - 2), min(n, guess + 2), 4
    while lo > 0 and covers(lo):
        lo, step = max(0, lo - step), step * 2
    while not covers(hi):
        if hi == n:
            raise ProbeError("token_ids_mismatch", "completion_token_ids do not decode to the completion")
        hi, step = min(n, hi + step), step * 2
    while lo < hi:  # invariant: covers(hi); not covers(lo) unless lo == 0 covers
        mid = (lo + hi) // 2
        if covers(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def check_completion_ids(tokenizer, completion: str, completion_ids: Sequence[int]) -> _Decoder:
    """The ids must be the scorer tokenizer's and decode exactly to the completion."""
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for t in completion_ids):
        raise ProbeError("invalid_token_ids", f"completion_token_ids must lie in [0, {vocab})")
    decoder = _Decoder(tokenizer, completion_ids)
    if decoder.prefix(len(completion_ids)) != completion:
        raise ProbeError(
            "token_ids_mismatch",
            "completion_token_ids do not decode to the completion with the scorer's tokenizer "
            "(the policy and the scorer must share a tokenizer to use ids)",
        )
    return decoder


def ids_probes(
    tokenizer,
    prompt: str,
    completion: str,
    completion_ids: Sequence[int],
    cut_0: int,
    steps: Sequence[tuple[int, int]],
    probe_prefix: str,
    references: Sequence[str],
    *,
    max_probe_tokens: int | None = None,
    media: ProbeMedia | None = None,
) -> tuple[TrajectoryProbes, list[tuple[int, int]]]:
    """Probes from the policy's token ids; also returns each step's [token_start, token_end)."""
    refs = encode_references(tokenizer, references)
    if max_probe_tokens is not None:
        check_probe_tokens(len(steps) + 1, refs, max_probe_tokens)
    decoder = check_completion_ids(tokenizer, completion, completion_ids)
    # Per-token decode lengths only guess where a character offset falls.
    pieces = tokenizer.batch_decode(
        [[t] for t in completion_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    approx = [0]
    for piece in pieces:
        approx.append(approx[-1] + len(piece))

    def guess(chars: int) -> int:
        lo, hi = 0, len(approx) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if approx[mid] >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def cover(chars: int) -> int:
        return token_cover(decoder, completion, chars, guess(chars))

    def tokens_before(chars: int) -> int:
        # Tokens lying wholly before character `chars`: those covering text[:chars],
        # less the last one when it reaches past it (into a character split over
        # several byte tokens, or a token that spans the boundary).
        if chars >= len(completion):
            return len(completion_ids)
        k = cover(chars)
        return k if len(decoder.prefix(k)) == chars else k - 1

    spans = [(tokens_before(a), cover(b)) for a, b in steps]
    cut_tokens = [spans[0][0] if spans else tokens_before(cut_0)] + [b for _, b in spans]

    prompt_ids = encode_text(tokenizer, [prompt])[0]
    prefix_ids = list(tokenizer(probe_prefix, add_special_tokens=False)["input_ids"]) if probe_prefix else []
    ids = list(completion_ids)
    contexts = [prompt_ids + ids[:c] + prefix_ids for c in cut_tokens]
    trunk = prompt_ids + ids[: cut_tokens[-1]]
    return TrajectoryProbes(trunk, contexts, refs, media), spans
