"""Texts (prompts, captions) -> term indicators: which samples' text contains each word or phrase."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffdissect.data.words import words_of
from diffdissect.errors import DataError

__all__ = ["TermIndicators", "term_indicators", "terms_of", "words_of"]


def terms_of(text: str, max_words: int = 1) -> set[str]:
    """Words and phrases of up to `max_words` consecutive words."""
    words = words_of(text)
    return {" ".join(words[i : i + n]) for n in range(1, max_words + 1) for i in range(len(words) - n + 1)}


@dataclass
class TermIndicators:
    """`matrix[i, j]`: sample i's text contains term j. Rows without text (`valid` False) are all zero."""

    terms: list[str]
    matrix: np.ndarray  # (N, V) float32 0/1
    valid: np.ndarray  # (N,) bool
    skipped: dict[str, str] = field(default_factory=dict)

    def column(self, term: str) -> np.ndarray:
        return self.matrix[:, self.terms.index(term)]

    def require(self, terms: list[str], source: str) -> None:
        """A clear error for a term that never occurs (or has no contrast) in this source."""
        for term in terms:
            if term in self.terms:
                continue
            why = self.skipped.get(term, "never occurs")
            raise DataError(
                f"{term!r} {why} in the {source}, so it has no direction; terms that do: "
                f"{self.terms[:20]}{' ...' if len(self.terms) > 20 else ''}."
            )


def term_indicators(
    texts: list[str | None], *, max_words: int = 1, min_count: int = 2, keep: list[str] | None = None
) -> TermIndicators:
    """Indicators of every term (word or phrase) with contrast: in at least `min_count` valid samples and
    absent from at least `min_count`. Terms in `keep` are reported even below `min_count` (if they occur).
    Terms without contrast are listed in `skipped` with the reason."""
    valid = np.array([t is not None for t in texts])
    if not valid.any():
        raise DataError("no sample has text (every caption failed?); nothing to compute directions from.")
    per_sample = [terms_of(t, max_words) if t is not None else set() for t in texts]
    counts: dict[str, int] = {}
    for s in per_sample:
        for term in s:
            counts[term] = counts.get(term, 0) + 1
    n_valid = int(valid.sum())
    terms, skipped = [], {}
    for term in sorted(counts):
        c = counts[term]
        if c == n_valid:
            skipped[term] = "occurs in every sample (no contrast)"
        elif min(c, n_valid - c) < min_count and term not in (keep or []):
            skipped[term] = f"occurs in {c} of {n_valid} samples (fewer than {min_count} on one side)"
        else:
            terms.append(term)
    index = {t: j for j, t in enumerate(terms)}
    matrix = np.zeros((len(texts), len(terms)), np.float32)
    for i, s in enumerate(per_sample):
        for term in s:
            j = index.get(term)
            if j is not None:
                matrix[i, j] = 1.0
    return TermIndicators(terms, matrix, valid, skipped)
