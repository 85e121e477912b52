"""The typed results of a probe sweep: one `ProbeCell` per (label, condition, layer, t), a `ProbeResults`
for the sweep, and the per-label `ProbeSummary` (the cell chosen on validation, with its controls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffdissect.result import Result, omit_if_none


@dataclass(frozen=True)
class ProbeCell(Result):
    """One probe's scores: test accuracy (mean over test images) with its bootstrap CI, and its chances."""

    label: str
    layer: str
    t: int
    condition: str  # trained, shuffled or random_init
    head: str
    accuracy: float
    ci_low: float
    ci_high: float
    seed_accuracy: dict[int, float]
    seed_std: float | None
    chance_uniform: float
    chance_majority: float
    chance_constant: float
    n_train_images: int
    n_val_images: int
    n_test_images: int
    l2: float | None
    val_accuracy: float
    train_accuracy: float
    converged: bool | None = omit_if_none()  # linear probes
    solver: str | None = omit_if_none()  # linear probes
    best_epoch: int | None = omit_if_none()  # attentive heads

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeCell:
        seeds = {int(k): float(v) for k, v in data["seed_accuracy"].items()}
        return super().from_json({**data, "seed_accuracy": seeds})


@dataclass(frozen=True)
class LabelInfo(Result):
    classes: list[Any]
    missing_rows: int


@dataclass(frozen=True)
class SplitInfo(Result):
    by: str  # "hash" or the split column's name
    salt: str
    images: dict[str, int]  # images per split


@dataclass(frozen=True)
class SkippedCell(Result):
    condition: str
    layer: str
    t: int
    reason: str


@dataclass(frozen=True)
class ProbeResults(Result):
    """A probe sweep: every cell's scores, with the labels, the split and the cells skipped."""

    store: str
    model: dict[str, Any]  # the store's model identity (`models.identity.comparable`)
    config: dict[str, Any]  # the ProbeConfig as JSON
    cells: list[tuple[str, int]]
    labels: dict[str, LabelInfo]
    split: SplitInfo
    split_by_image: dict[str, str]
    results: list[ProbeCell]
    skipped: list[SkippedCell] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def head(self) -> str:
        return str(self.config["head"])

    @property
    def bootstrap(self) -> int:
        return int(self.config["bootstrap"])

    def cells_of(self, label: str, condition: str = "trained") -> list[ProbeCell]:
        return [r for r in self.results if r.label == label and r.condition == condition]

    def conditions(self) -> list[str]:
        return list(dict.fromkeys(r.condition for r in self.results))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResults:
        return cls(
            store=data["store"],
            model=data.get("model", {}),
            config=data["config"],
            cells=[(str(c[0]), int(c[1])) for c in data["cells"]],
            labels={k: LabelInfo.from_json(v) for k, v in data["labels"].items()},
            split=SplitInfo.from_json(data["split"]),
            split_by_image=data.get("split_by_image", {}),
            results=[ProbeCell.from_json(r) for r in data["results"]],
            skipped=[SkippedCell.from_json(s) for s in data.get("skipped", [])],
            seconds=data.get("seconds", 0.0),
        )


@dataclass(frozen=True)
class ControlSummary(Result):
    """A control at its own validation-chosen cell (JSON keys prefixed with the control's name)."""

    best_accuracy: float  # chosen on validation, scored on test
    best_cell: str
    ci: list[float]
    test_max_accuracy: float  # max over cells: biased upwards
    mean_accuracy: float
    chance_constant: float
    at_best_cell: float | None = omit_if_none()  # the control at the trained probe's chosen cell


@dataclass(frozen=True)
class ProbeSummary(Result):
    """Per label: the trained cell chosen on validation, and each control at its own validation-chosen cell."""

    label: str
    classes: int
    selected_on: str
    best_layer: str
    best_t: int
    best_val_accuracy: float
    best_accuracy: float
    ci: list[float]
    chance_majority: float
    test_max_accuracy: float  # the old headline: max over cells of test accuracy (biased upwards)
    test_max_cell: str
    controls: dict[str, ControlSummary] = field(default_factory=dict)

    def control(self, name: str) -> ControlSummary | None:
        return self.controls.get(name)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.pop("controls")
        for name, control in self.controls.items():
            out.update({f"{name}_{k}": v for k, v in control.to_json().items()})
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeSummary:
        controls = {}
        for name in ("shuffled", "random_init"):
            prefix = f"{name}_"
            if f"{prefix}best_accuracy" in data:
                controls[name] = ControlSummary.from_json(
                    {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
                )
        base = super().from_json({k: v for k, v in data.items() if k != "controls"})
        return cls(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "controls": controls})
