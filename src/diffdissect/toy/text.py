"""Offline CLIP tokenizers and text encoders built from a word list (no hub download)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def build_clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges turn every word of `words` into one token.

    Other text falls back to characters, and characters outside CHARS to <|endoftext|> (unk), as in SD.
    """
    words = list(dict.fromkeys(words))
    merges = [(w[:i], w[i] + ("</w>" if i == len(w) - 1 else "")) for w in words for i in range(1, len(w))]
    tokens = [*CHARS, *(c + "</w>" for c in CHARS), *dict.fromkeys(a + b for a, b in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*tokens, "<|startoftext|>", "<|endoftext|>"]))}
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in dict.fromkeys(merges)))
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length)


def build_clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel sized for `tokenizer` (seed the RNG before calling)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
