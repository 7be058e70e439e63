"""The BART tokenizer X-VLA reads its instructions with (`padding="max_length"`, truncation).

Real runs load it from the X-VLA-Pt checkpoint directory (its vocab.json / merges.txt or tokenizer.json) and
save it into every checkpoint. Tiny configs use a byte-level BART tokenizer built in memory (no merges, 261 ids in
BART's special-token order), so tests and the synthetic pipeline need no download.
"""

from __future__ import annotations

import os
from typing import Any

BYTE_LEVEL_VOCAB_SIZE = 261


def byte_level_tokenizer() -> Any:
    """A BART tokenizer over single bytes: <s>=0, <pad>=1, </s>=2, <unk>=3, the 256 byte symbols, <mask>."""
    from tokenizers import pre_tokenizers
    from transformers import BartTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    return BartTokenizer(vocab=vocab, merges=[])


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer saved in a checkpoint directory, else the byte-level one (FileNotFoundError never: tiny
    models are meant to run without files)."""
    if path and has_tokenizer(path):
        from transformers import BartTokenizer

        return BartTokenizer.from_pretrained(path, local_files_only=True)
    return byte_level_tokenizer()


def encode(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids, padded / truncated to exactly `max_len` (X-VLA's processor settings)."""
    return tokenizer(texts, padding="max_length", max_length=max_len, truncation=True)["input_ids"]
