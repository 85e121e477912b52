"""SAE inputs from a store slice: pooled rows, or every spatial location as a token; a held-out split by image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffdissect.probe.splits import SplitConfig, split_images
from diffdissect.store import StoreReader
from diffdissect.store.stream import MixingStream


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
    part: tuple[int, int] = (0, 1)  # (rank, world): this rank trains on its own images only

    def __post_init__(self) -> None:
        self.reader.manifest.check_slice(self.layer, self.t)
        fraction = self.heldout_fraction
        ids = self.reader.column("input_id")
        split = split_images(ids, SplitConfig(train=1 - fraction, val=fraction / 2, test=fraction / 2, salt=self.salt))
        self.train_rows = split.mask("train")
        self.heldout_rows = ~self.train_rows
        rank, world = self.part
        if world > 1:  # disjoint shares by image: the j-th training image (in id order) -> rank j mod world
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
            raise ValueError(
                f"{self.layer} is stored pooled (shape {shape}); per-location tokens need a capture with --pooling none"
            )

    @property
    def train_tokens(self) -> int:
        return int(self.train_rows.sum()) * self.locations

    def heldout(self, max_tokens: int = 65536) -> torch.Tensor:
        """Held-out tokens (every location of held-out images), at most `max_tokens` (evenly spaced)."""
        parts = [
            to_tokens(block, self.tokens)
            for block in self.reader.iter_batches(
                self.layer, self.t, 1024, format="torch", dtype="float32", select=self.heldout_rows
            )
        ]
        x = torch.cat(parts) if parts else torch.empty(0, self.d_in, device="cpu")
        if len(x) > max_tokens:
            x = x[torch.linspace(0, len(x) - 1, max_tokens, device="cpu").long()]
        return x

    def sample(self, n: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """The first `n` training tokens in a fixed shuffle (for initialisation)."""
        stream = self.batches(n, seed=-1, device=device, prefetch=0)
        try:
            return next(stream)
        finally:
            stream.close()

    def batches(
        self,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        *,
        device: str | torch.device = "cpu",
        mix_shards: int = 4,
        skip: int = 0,
        prefetch: int = 1,
    ) -> MixingStream:
        """Endless float32 batches of training tokens on `device`; epoch e is shuffled with (seed, e), mixing
        row ranges of every shard in pools of about `mix_shards` shards (`store.stream`). Deterministic.
        The first `skip` batches are passed over without being read out (a resumed run). `close()` it."""
        return MixingStream(
            self.reader,
            self.layer,
            self.t,
            batch_size,
            seed=seed,
            select=self.train_rows,
            tokens=self.tokens,
            pool_locations=not self.tokens,
            mix_shards=mix_shards,
            dtype=torch.float32,
            device=device,
            epochs=None,
            start_epoch=start_epoch,
            drop_last=True,
            skip=skip,
            prefetch=prefetch,
        )
