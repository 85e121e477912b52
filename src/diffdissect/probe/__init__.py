"""Probes across layers x timesteps: vectorised linear probes (and a small attentive head), with controls."""

from diffdissect.probe.labels import encode_labels
from diffdissect.probe.linear import fit_linear_probes, fit_sklearn_probe
from diffdissect.probe.output import best_cell, grid, probe_section, summary_rows, write_probe_outputs
from diffdissect.probe.results import ControlSummary, ProbeCell, ProbeResults, ProbeSummary
from diffdissect.probe.run import ProbeConfig, run_probes
from diffdissect.probe.splits import SplitConfig, split_images

__all__ = [
    "ControlSummary",
    "ProbeCell",
    "ProbeConfig",
    "ProbeResults",
    "ProbeSummary",
    "SplitConfig",
    "best_cell",
    "encode_labels",
    "fit_linear_probes",
    "fit_sklearn_probe",
    "grid",
    "probe_section",
    "run_probes",
    "split_images",
    "summary_rows",
    "write_probe_outputs",
]


def __getattr__(name: str) -> object:  # the names before "one word for configs" (deprecated)
    from diffdissect.runtime import deprecated_alias

    return deprecated_alias(__name__, name, {"SplitSpec": SplitConfig})
