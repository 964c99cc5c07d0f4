"""Real tokenizers that split text differently from the scorer's (SmolLM2), built
offline with the `tokenizers` library: a byte-level BPE with a tiny vocabulary
and a lower-casing BERT WordPiece (whose decode does not reproduce the text)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "We add 2 and 3. Then 2 + 3 = 5, so the sum is 5.",
    "First multiply twelve by three: 12 * 3 = 36. Then add four: 36 + 4 = 40.",
    "<think> reasoning steps </think> <answer> final answer </answer>",
    "Step 1: read the question. Step 2: compute. Step 3: check the result.",
] * 20


def byte_bpe(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<eos>"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def bert_wordpiece(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[SEP]"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", sep_token="[SEP]")
