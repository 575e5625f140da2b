"""Toy byte-level BPE tokenizers over the alphabet `a`, `b`, space: one token per character, or with merged pairs.

Real fast tokenizers (the `tokenizers` library), with GPT-2's byte-level pre-tokenization, so offsets, words and
decoding are those of real byte-level BPE teachers and students. Their first ids are the characters and the merged
pairs, the last one `<eos>`.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ALPHABET = ["a", "b", " "]
PAIRS = [("a", "b"), (" ", "a"), ("b", "a"), (" ", " ")]  # merge order: earlier pairs merge first
EOS = "<eos>"


def _byte_level(text: str) -> str:
    return text.replace(" ", "Ġ")


def toy_tokenizer(pairs: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `ALPHABET` with the given merges (none: one token per character) and `<eos>`."""
    tokens = ALPHABET + [left + right for left, right in pairs]
    vocab = {_byte_level(token): index for index, token in enumerate(tokens)}
    merges = [(_byte_level(left), _byte_level(right)) for left, right in pairs]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    assert tokenizer.eos_token_id == len(tokens)
    return tokenizer


def char_tokenizer() -> PreTrainedTokenizerFast:
    return toy_tokenizer([])


def pair_tokenizer() -> PreTrainedTokenizerFast:
    return toy_tokenizer(PAIRS)
