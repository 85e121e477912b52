"""SAE inputs from a store slice: pooled rows, or every spatial location as a token; a held-out split by image."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from diffdissect.errors import StoreError
from diffdissect.probe.splits import SplitSpec, split_images
from diffdissect.store import StoreReader


def to_tokens(block: torch.Tensor, tokens: bool) -> torch.Tensor:
    """(rows, d) pooled rows stay; (rows, d, h, w) maps become (rows*h*w, d) tokens, or are mean-pooled."""
    if block.dim() == 2:
        return block
    if tokens:
        return block.flatten(2).transpose(1, 2).reshape(-1, block.shape[1])
    return block.flatten(2).mean(-1)


@dataclass
class SliceData:
    """One (layer, t) slice split by image into training rows and held-out rows."""

    reader: StoreReader
    layer: str
    t: int
    tokens: bool
    heldout_fraction: float = 0.1
    salt: str = "diffdissect-sae-v1"
    part: tuple[int, int] = (0, 1)          # (rank, world): this rank trains on its own images only

    def __post_init__(self) -> None:
        self.reader.manifest.check_slice(self.layer, self.t)
        fraction = self.heldout_fraction
        ids = self.reader.column("input_id")
        split = split_images(ids, SplitSpec(train=1 - fraction, val=fraction / 2, test=fraction / 2, salt=self.salt))
        self.train_rows = split.mask("train")
        self.heldout_rows = ~self.train_rows
        rank, world = self.part
        if world > 1:      # disjoint shares by image: the j-th training image (in id order) -> rank j mod world
            _, image = np.unique(np.asarray(ids), return_inverse=True)
            train_images = np.unique(image[self.train_rows])
            position = np.full(image.max() + 1, -1)
            position[train_images] = np.arange(len(train_images))
            self.train_rows = self.train_rows & (position[image] % world == rank)
        self.by_image = split.by_image
        shape = self.reader.shape(self.layer)
        self.d_in = int(shape[0])
        self.locations = int(np.prod(shape[1:])) if (tokens_ok := len(shape) > 1) and self.tokens else 1
        if self.tokens and not tokens_ok:
            raise ValueError(f"{self.layer} is stored pooled (shape {shape}); per-location tokens need a capture "
                             "with --pooling none")

    @property
    def train_tokens(self) -> int:
        return int(self.train_rows.sum()) * self.locations

    def heldout(self, max_tokens: int = 65536) -> torch.Tensor:
        """Held-out tokens (every location of held-out images), at most `max_tokens` (evenly spaced)."""
        parts = []
        for block, ids in self.reader.iter_batches(self.layer, self.t, 1024, format="torch", with_rows=True,
                                                    dtype="float32"):
            keep = torch.from_numpy(self.heldout_rows[ids])
            if keep.any():
                parts.append(to_tokens(block[keep], self.tokens))
        x = torch.cat(parts) if parts else torch.empty(0, self.d_in)
        if len(x) > max_tokens:
            x = x[torch.linspace(0, len(x) - 1, max_tokens).long()]
        return x

    def sample(self, n: int) -> torch.Tensor:
        """The first `n` training tokens in a fixed shuffle (for initialisation)."""
        return next(self.batches(n, seed=-1))

    def batches(self, batch_size: int, seed: int, start_epoch: int = 0) -> Iterator[torch.Tensor]:
        """Endless batches of training tokens; epoch e is shuffled with (seed, e). Deterministic."""
        epoch = start_epoch
        while True:
            produced = False
            for batch in self._epoch(batch_size, np.random.default_rng([seed & 0xFFFFFFFF, epoch])):
                produced = True
                yield batch
            if not produced:          # never spin: an epoch without one full batch would repeat forever
                raise StoreError(f"{self.layer} @ t={self.t}: an epoch over the store gave no batch of {batch_size} "
                                 f"training tokens ({self.train_tokens} expected); the store's row counts disagree "
                                 "with its shards, or the batch is larger than the data. Run `diffdissect store "
                                 "verify`.")
            epoch += 1

    def _epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        pending, count = [], 0
        read_rows = max(1, 65536 // self.locations)
        for block, ids in self.reader.iter_batches(self.layer, self.t, read_rows, shuffle=True,
                                                    seed=int(rng.integers(2**31)), format="torch", with_rows=True,
                                                    dtype="float32"):
            keep = torch.from_numpy(self.train_rows[ids])
            if not keep.any():
                continue
            x = to_tokens(block[keep], self.tokens)
            x = x[torch.from_numpy(rng.permutation(len(x)))]
            pending.append(x)
            count += len(x)
            while count >= batch_size:
                joined = torch.cat(pending)
                yield joined[:batch_size]
                pending, count = [joined[batch_size:]], count - batch_size
        # the epoch's remainder (< batch_size tokens) is dropped so every step sees a full batch
