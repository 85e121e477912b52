"""FeatInv: invert a classifier's feature maps to images with a ControlNet on a frozen diffusion model."""

from diffdissect.invert.features import FeatureError, FeatureExtractor, pool, to_grid
from diffdissect.invert.model import HintBlock, Inverter, build_controlnet, load_inverter, save_inverter
from diffdissect.invert.sample import invert
from diffdissect.invert.train import InvertTrainConfig, train_inverter

__all__ = [
    "FeatureError",
    "FeatureExtractor",
    "HintBlock",
    "InvertTrainConfig",
    "Inverter",
    "build_controlnet",
    "invert",
    "load_inverter",
    "pool",
    "save_inverter",
    "to_grid",
    "train_inverter",
]
