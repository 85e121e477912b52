"""Loading diffusion targets (pipelines, bare denoisers, plain modules) and listing their layers."""
from diffdissect.models.target import Target
from diffdissect.models.load import load_target
from diffdissect.models.layers import LayerInfo, list_layers, resolve_layers

__all__ = ["Target", "load_target", "LayerInfo", "list_layers", "resolve_layers"]
