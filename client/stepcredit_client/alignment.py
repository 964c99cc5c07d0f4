"""Where a character of the completion falls in the POLICY's tokens.

The service reports steps as character spans of the completion it scored. A
trainer needs them as token positions in its own tokenization, which may split
the text quite differently from the scorer's tokenizer. Two ways to know the
policy's tokens:

* `OffsetAlignment`: character offsets per token, from a fast tokenizer's
  `return_offsets_mapping` (re-tokenizes the text; right when the policy's ids
  are that tokenization, or when only text is at hand);
* `DecodeAlignment`: the policy's actual token ids, located by decoding their
  prefixes (right for sampled ids, which need not be the canonical tokenization).

Neither imports a tokenizer library: pass the tokenizer object you already have.
Both raise `AlignmentError` rather than guess when the text does not match.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol

from ._exceptions import AlignmentError

__all__ = ["TokenAlignment", "OffsetAlignment", "DecodeAlignment"]


class TokenAlignment(Protocol):
    """Maps character offsets of the completion to token indices."""

    @property
    def n_tokens(self) -> int: ...

    def last_token(self, char_end: int) -> int:
        """Index of the token holding character `char_end - 1` (a span's last character)."""

    def span(self, char_start: int, char_end: int) -> tuple[int, int]:
        """[first, last + 1) of the tokens overlapping characters [char_start, char_end)."""


class OffsetAlignment:
    """Alignment from per-token `(start, end)` character offsets."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self.offsets = [(int(a), int(b)) for a, b in offsets]
        # Zero-width tokens (special tokens, some normalizers) hold no character.
        self._real = [i for i, (a, b) in enumerate(self.offsets) if b > a]
        self._starts = [self.offsets[i][0] for i in self._real]

    @classmethod
    def from_tokenizer(cls, tokenizer, text: str) -> OffsetAlignment:
        """Tokenize `text` with a Hugging Face fast tokenizer (no special tokens)."""
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as exc:  # slow (Python) tokenizers have no offsets
            raise AlignmentError(f"this tokenizer gives no offsets: {exc}") from None
        return cls(encoded["offset_mapping"])

    @property
    def n_tokens(self) -> int:
        return len(self.offsets)

    def _token_at(self, char: int) -> int:
        # The last real token starting at or before `char`: the one holding it, or,
        # when the tokenizer dropped that character (whitespace), the one before.
        k = bisect.bisect_right(self._starts, char) - 1
        if k < 0:
            raise AlignmentError(f"character {char} lies before the first token")
        return self._real[k]

    def last_token(self, char_end: int) -> int:
        if char_end < 1:
            raise AlignmentError("an empty span has no last token")
        return self._token_at(char_end - 1)

    def span(self, char_start: int, char_end: int) -> tuple[int, int]:
        if char_end <= char_start:
            return (0, 0)
        first = bisect.bisect_right(self._starts, char_start) - 1
        first_token = self._real[first] if first >= 0 and self.offsets[self._real[first]][1] > char_start else None
        if first_token is None:  # char_start sits in a gap: the next real token starts the span
            k = bisect.bisect_left(self._starts, char_start)
            if k >= len(self._real):
                return (0, 0)
            first_token = self._real[k]
        return (first_token, self.last_token(char_end) + 1)


class DecodeAlignment:
    """Alignment of the policy's own token ids, found by decoding prefixes.

    `text` must be what the ids decode to with `skip_special_tokens` (that is the
    text to send to the service). Each lookup is a binary search over prefix
    decodes, so a completion with K steps costs about K·log2(n) decodes.
    """

    def __init__(self, tokenizer, ids: Sequence[int], text: str, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [int(t) for t in ids], text
        self.skip_special_tokens = skip_special_tokens
        self._cache: dict[int, str] = {}
        if self._prefix(len(self.ids)) != text:
            raise AlignmentError(
                "the token ids do not decode to the completion text: send the text decoded from these ids"
            )

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def _prefix(self, j: int) -> str:
        if j not in self._cache:
            self._cache[j] = self.tokenizer.decode(
                self.ids[:j], skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
            )
        return self._cache[j]

    def _covers(self, j: int, chars: int) -> bool:
        got = self._prefix(j)
        return len(got) >= chars and got[:chars] == self.text[:chars]

    def _cover(self, chars: int) -> int:
        """Fewest leading tokens whose decode reproduces text[:chars] exactly.

        Length alone is not enough: on byte-level tokenizers a character may span
        several tokens, and a prefix that stops inside it decodes to U+FFFD
        replacement characters, long enough but not the text. The test is the
        service's (`probes.token_cover`), and it is monotone in the token count.
        """
        if not self._covers(len(self.ids), chars):
            raise AlignmentError(f"no token boundary reproduces the first {chars} characters")
        lo, hi = 0, len(self.ids)
        while lo < hi:  # invariant: the first hi tokens cover
            mid = (lo + hi) // 2
            if self._covers(mid, chars):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def last_token(self, char_end: int) -> int:
        if char_end < 1:
            raise AlignmentError("an empty span has no last token")
        return self._cover(char_end) - 1

    def span(self, char_start: int, char_end: int) -> tuple[int, int]:
        if char_end <= char_start:
            return (0, 0)
        return (self._before(char_start), self._cover(char_end))

    def _before(self, chars: int) -> int:
        """Tokens lying wholly before character `chars` (the service's rule): a token
        that reaches past it, such as the first byte token of a character split over
        several, belongs to what follows."""
        k = self._cover(chars)
        return k if len(self._prefix(k)) == chars else k - 1
