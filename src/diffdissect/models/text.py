"""Offline CLIP tokenizers and text encoders built from a word list (no hub download)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _word_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens and ranked merges of a BPE trained on `words`, each word ending in '</w>' as in CLIP.

    BPE applies merges by rank across a whole word, so merges written word by word interfere
    (an early 're' from 'red' splits 'green'); a trained merge list reproduces every training word.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(
        words,
        trainers.BpeTrainer(
            vocab_size=100_000,
            min_frequency=0,
            show_progress=False,
            end_of_word_suffix="</w>",
            initial_alphabet=list(CHARS),
        ),
    )
    model = json.loads(bpe.to_str())["model"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    return list(model["vocab"]), [(a, b) for a, b in pairs]


def build_clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of `words` is exactly one token.

    Other text falls back to characters, and characters outside CHARS to <|endoftext|> (unk), as in SD.
    """
    words = list(dict.fromkeys(words))
    bad = [w for w in words if not w or set(w) - set(CHARS)]
    if bad:
        raise ValueError(f"vocabulary words must be non-empty and use only {CHARS!r}; got {bad}")
    trained, merges = _word_merges(words)
    tokens = [*CHARS, *(c + "</w>" for c in CHARS), *trained, *SPECIAL]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=max_length)
    split = {w: tokenizer.tokenize(w) for w in words}
    if any(len(pieces) != 1 for pieces in split.values()):  # a broken merge list would silently split words
        raise RuntimeError(f"tokenizer splits vocabulary words: { {w: p for w, p in split.items() if len(p) != 1} }")
    return tokenizer


def build_clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel sized for `tokenizer` (seed the RNG before calling)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
