"""k-sparse (TopK / BatchTopK) autoencoders on store slices, their metrics and feature analysis."""

from diffdissect.sae.checkpoint import load_sae
from diffdissect.sae.metrics import evaluate
from diffdissect.sae.model import Codes, SAEConfig, TopKSAE
from diffdissect.sae.train import NonFiniteTrainingError, TrainConfig, train_sae, train_saes

__all__ = [
    "Codes",
    "NonFiniteTrainingError",
    "SAEConfig",
    "TopKSAE",
    "TrainConfig",
    "evaluate",
    "load_sae",
    "train_sae",
    "train_saes",
]
