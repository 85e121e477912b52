"""Decoding Diffusion: h-space directions for the words of prompts and captions, biases, clusters."""

from diffdissect.directions.captioners import TransformersCaptioner, caption_images, load_captioner
from diffdissect.directions.compute import mean_difference_directions, ridge_directions
from diffdissect.directions.prompts import Prompt, build_prompt_set
from diffdissect.directions.report import directions_section, write_directions_report
from diffdissect.directions.run import BiasConfig, DirectionsConfig, run_directions

__all__ = [
    "BiasConfig",
    "DirectionsConfig",
    "Prompt",
    "TransformersCaptioner",
    "build_prompt_set",
    "caption_images",
    "directions_section",
    "load_captioner",
    "mean_difference_directions",
    "ridge_directions",
    "run_directions",
    "write_directions_report",
]


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"BiasSpec": BiasConfig})
