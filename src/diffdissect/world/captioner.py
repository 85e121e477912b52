"""The shapes world's captioner: its attribute captioner network, writing the world's full caption."""

from __future__ import annotations

import numpy as np
import torch

from diffdissect.errors import DiffdissectError
from diffdissect.world.classifiers import AttributeCaptioner, images_to_tensor
from diffdissect.world.generator import WorldConfig, full_caption


class WorldCaptioner:
    """The shapes world's attribute captioner, as a full world caption ("a small red square at the top left").

    A captioner in the sense of `diffdissect.directions.captioners.Captioner`: `name` and `caption(images)`.
    Get one from `ShapesWorld.captioner()`."""

    def __init__(self, config: WorldConfig, model: AttributeCaptioner):
        self.world = config
        self.model = model
        self.name = "shapes-world attribute captioner"

    @torch.no_grad()
    def caption(self, images: np.ndarray) -> list[str]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DiffdissectError(f"expected (N, H, W, 3) images, got shape {images.shape}")
        if images.shape[1:3] != (self.world.image_size, self.world.image_size):
            raise DiffdissectError(
                f"the world captioner reads {self.world.image_size}x{self.world.image_size} images, "
                f"got {images.shape[1]}x{images.shape[2]}"
            )
        pred = self.model.predict(images_to_tensor(images))
        return [full_caption(self.world, {f: int(v[i]) for f, v in pred.items()}) for i in range(len(images))]
