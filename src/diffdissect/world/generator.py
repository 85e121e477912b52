"""The shapes world: procedural 32x32 images of one shape with known factors and planted correlations.

Factors: shape, colour, size, horizontal position (xpos), vertical position (ypos). Colour depends on
shape through `colour_given_shape` (the planted defaults: one shape strongly biased, one medium, one
weak, one unbiased). Captions name each factor with a probability (`keep`), so captions that omit
the colour still come from the skewed joint distribution: that is what a model learns as a default.
Everything is deterministic from a seed and vectorised (numpy), so generation is fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffdissect.errors import DiffdissectError

FACTORS = ("shape", "colour", "size", "xpos", "ypos")


class WorldConfigError(DiffdissectError):
    """The world config is invalid (unknown factor or value, rates outside [0, 1] or not summing to 1)."""


def _uniform(names: list[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


def _skewed(names: list[str], favourite: str, p: float) -> dict[str, float]:
    rest = (1.0 - p) / (len(names) - 1)
    return {n: (p if n == favourite else rest) for n in names}


_COLOURS = {"red": (215, 45, 40), "green": (40, 170, 70), "blue": (45, 80, 215), "yellow": (235, 205, 40)}
_SHAPES = ["circle", "square", "triangle", "cross"]


@dataclass
class WorldConfig:
    """Everything that defines the world. Validated on construction; round-trips through JSON."""

    image_size: int = 32
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(_COLOURS))
    shapes: list[str] = field(default_factory=lambda: list(_SHAPES))
    sizes: dict[str, float] = field(default_factory=lambda: {"small": 5.0, "large": 8.5})  # half-extent px
    xpos: dict[str, float] = field(default_factory=lambda: {"left": 0.31, "right": 0.69})  # centre / width
    ypos: dict[str, float] = field(default_factory=lambda: {"top": 0.32, "bottom": 0.69})  # centre / height
    shape_rates: dict[str, float] = field(default_factory=lambda: _uniform(_SHAPES))
    size_rates: dict[str, float] = field(default_factory=lambda: {"small": 0.5, "large": 0.5})
    # the planted defaults: P(colour | shape)
    colour_given_shape: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "square": _skewed(list(_COLOURS), "red", 0.85),  # strong
            "triangle": _skewed(list(_COLOURS), "blue", 0.60),  # medium
            "circle": _skewed(list(_COLOURS), "green", 0.40),  # weak
            "cross": _uniform(list(_COLOURS)),  # unbiased
        }
    )
    bias_strength: dict[str, str] = field(
        default_factory=lambda: {"square": "strong", "triangle": "medium", "circle": "weak", "cross": "unbiased"}
    )
    keep: dict[str, float] = field(default_factory=lambda: {"shape": 0.9, "colour": 0.7, "size": 0.7, "position": 0.7})
    position_jitter: float = 1.5  # px, uniform
    size_jitter: float = 0.08  # relative, uniform
    colour_jitter: int = 12  # per channel, uniform
    background: tuple[int, int, int] = (120, 120, 120)
    background_jitter: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check_rates(name: str, rates: dict[str, float], values: list[str]) -> None:
            unknown = set(rates) - set(values)
            if unknown:
                raise WorldConfigError(f"{name}: unknown value(s) {sorted(unknown)}; known: {values}.")
            if set(values) - set(rates):
                raise WorldConfigError(f"{name}: missing rates for {sorted(set(values) - set(rates))}.")
            bad = {k: v for k, v in rates.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise WorldConfigError(f"{name}: rates must lie in [0, 1]; got {bad}.")
            if abs(sum(rates.values()) - 1.0) > 1e-6:
                raise WorldConfigError(f"{name}: rates must sum to 1; they sum to {sum(rates.values()):.6g}.")

        if len(self.shapes) < 2 or len(self.colours) < 2:
            raise WorldConfigError("the world needs at least 2 shapes and 2 colours.")
        unknown_shapes = set(self.shapes) - set(SHAPE_RENDERERS)
        if unknown_shapes:
            raise WorldConfigError(f"unknown shape(s) {sorted(unknown_shapes)}; drawable: {sorted(SHAPE_RENDERERS)}.")
        check_rates("shape_rates", self.shape_rates, self.shapes)
        check_rates("size_rates", self.size_rates, list(self.sizes))
        unknown = set(self.colour_given_shape) - set(self.shapes)
        if unknown:
            raise WorldConfigError(f"colour_given_shape: unknown shape(s) {sorted(unknown)}; shapes: {self.shapes}.")
        for shape in self.shapes:
            if shape not in self.colour_given_shape:
                raise WorldConfigError(f"colour_given_shape has no rates for shape {shape!r}.")
            check_rates(f"colour_given_shape[{shape!r}]", self.colour_given_shape[shape], list(self.colours))
        unknown = set(self.keep) - {"shape", "colour", "size", "position"}
        if unknown:
            raise WorldConfigError(
                f"keep: unknown factor(s) {sorted(unknown)}; factors: shape, colour, size, position."
            )
        for k, v in self.keep.items():
            if not 0.0 <= v <= 1.0:
                raise WorldConfigError(f"keep[{k!r}] = {v} is not a probability in [0, 1].")

    # ---- vocabulary --------------------------------------------------------------------------
    def values(self, factor: str) -> list[str]:
        return {
            "shape": self.shapes,
            "colour": list(self.colours),
            "size": list(self.sizes),
            "xpos": list(self.xpos),
            "ypos": list(self.ypos),
        }[factor]

    def vocabulary(self) -> list[str]:
        """Every word a caption can use."""
        words = ["a", "shape", "at", "the", *self.shapes, *self.colours, *self.sizes, *self.xpos, *self.ypos]
        return list(dict.fromkeys(words))

    def planted_rates(self) -> dict[str, dict[str, float]]:
        return {s: dict(r) for s, r in self.colour_given_shape.items()}

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise WorldConfigError(f"unknown world config field(s) {sorted(unknown)}; known: {sorted(known)}.")
        data = dict(data)
        for key in ("colours",):
            if key in data:
                data[key] = {k: tuple(v) for k, v in data[key].items()}
        if "background" in data:
            data["background"] = tuple(data["background"])
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> WorldConfig:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class WorldBatch:
    """Images (N, H, W, 3) uint8, factor indices per factor (N,), captions and the keep flags."""

    images: np.ndarray
    factors: dict[str, np.ndarray]
    captions: list[str]
    kept: dict[str, np.ndarray]
    config: WorldConfig
    masks: np.ndarray | None = None  # (N, H, W) float32 object coverage in [0, 1] (where the shape is)

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, factor: str) -> list[str]:
        names = self.config.values(factor)
        return [names[i] for i in self.factors[factor]]


def sample_factors(n: int, rng: np.random.Generator, config: WorldConfig) -> dict[str, np.ndarray]:
    """Draw factor indices from the world's joint distribution (colour depends on shape)."""
    shape = rng.choice(len(config.shapes), size=n, p=[config.shape_rates[s] for s in config.shapes])
    colour_names = list(config.colours)
    table = np.array([[config.colour_given_shape[s][c] for c in colour_names] for s in config.shapes])
    cumulative = np.cumsum(table, axis=1)[shape]
    colour = np.minimum((rng.random(n)[:, None] > cumulative).sum(axis=1), len(colour_names) - 1)
    size = rng.choice(len(config.sizes), size=n, p=[config.size_rates[s] for s in config.sizes])
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "xpos": rng.integers(0, len(config.xpos), n),
        "ypos": rng.integers(0, len(config.ypos), n),
    }


def caption(config: WorldConfig, factors: dict[str, int], kept: dict[str, bool]) -> str:
    """'a small red circle at the top left'; omitted factors are left out ('a square', 'a red shape')."""
    words = ["a"]
    if kept["size"]:
        words.append(config.values("size")[factors["size"]])
    if kept["colour"]:
        words.append(config.values("colour")[factors["colour"]])
    words.append(config.shapes[factors["shape"]] if kept["shape"] else "shape")
    if kept["position"]:
        words += ["at", "the", config.values("ypos")[factors["ypos"]], config.values("xpos")[factors["xpos"]]]
    return " ".join(words)


def full_caption(config: WorldConfig, factors: dict[str, int]) -> str:
    return caption(config, factors, {"shape": True, "colour": True, "size": True, "position": True})


def sample_world(
    n: int, seed: int = 0, config: WorldConfig | None = None, factors: dict[str, np.ndarray] | None = None
) -> WorldBatch:
    """`n` images with factors, captions and keep flags; the same seed gives the same bytes."""
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    factors = {k: np.asarray(v) for k, v in factors.items()} if factors is not None else sample_factors(n, rng, config)
    kept = {k: rng.random(n) < p for k, p in config.keep.items()}
    images, coverage = draw(factors, rng, config)
    return WorldBatch(images, factors, captions_for(config, factors, kept), kept, config, coverage)


def captions_for(config: WorldConfig, factors: dict[str, np.ndarray], kept: dict[str, np.ndarray]) -> list[str]:
    """Vectorised :func:`caption` for a batch (same words, same order)."""

    def words(factor: str) -> np.ndarray:
        return np.array(config.values(factor), dtype=object)[factors[factor]]

    out = np.full(len(factors["shape"]), "a", dtype=object)
    out = np.where(kept["size"], out + " " + words("size"), out)
    out = np.where(kept["colour"], out + " " + words("colour"), out)
    out = out + " " + np.where(kept["shape"], words("shape"), "shape")
    out = np.where(kept["position"], out + " at the " + words("ypos") + " " + words("xpos"), out)
    return out.tolist()


def render(factors: dict[str, np.ndarray], rng: np.random.Generator, config: WorldConfig) -> np.ndarray:
    """Draw the shapes with analytic anti-aliasing (coverage from signed distance)."""
    return draw(factors, rng, config)[0]


def draw(
    factors: dict[str, np.ndarray], rng: np.random.Generator, config: WorldConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, H, W, 3) uint8 and each shape's coverage (N, H, W) float32 in [0, 1]: its object mask."""
    n, size = len(factors["shape"]), config.image_size
    xs = np.array(list(config.xpos.values()))[factors["xpos"]] * size
    ys = np.array(list(config.ypos.values()))[factors["ypos"]] * size
    cx = (xs + rng.uniform(-config.position_jitter, config.position_jitter, n))[:, None, None]
    cy = (ys + rng.uniform(-config.position_jitter, config.position_jitter, n))[:, None, None]
    r = (
        np.array(list(config.sizes.values()))[factors["size"]]
        * (1 + rng.uniform(-config.size_jitter, config.size_jitter, n))
    )[:, None, None]
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = (grid[None, None, :] - cx).astype(np.float32)
    dy = (grid[None, :, None] - cy).astype(np.float32)
    coverage = np.zeros((n, size, size), np.float32)
    for s, name in enumerate(config.shapes):
        idx = np.nonzero(factors["shape"] == s)[0]
        if len(idx):
            coverage[idx] = 0.5 - SHAPE_RENDERERS[name](dx[idx], dy[idx], r[idx])
    np.clip(coverage, 0.0, 1.0, out=coverage)
    colours = np.array(list(config.colours.values()), np.float32)[factors["colour"]]
    colours = np.clip(colours + rng.uniform(-config.colour_jitter, config.colour_jitter, (n, 3)), 0, 255)
    background = np.clip(
        np.array(config.background, np.float32)
        + rng.uniform(-config.background_jitter, config.background_jitter, (n, 1)),
        0,
        255,
    ).astype(np.float32)
    # background + coverage * (colour - background): a convex mix, already inside [0, 255]
    image = coverage[..., None] * (colours - background)[:, None, None, :].astype(np.float32)
    image += background[:, None, None, :] + 0.5
    return image.astype(np.uint8), coverage


# signed distance (negative inside) of each shape, centred at 0 with half-extent r
def _circle(dx, dy, r):
    return np.sqrt(dx * dx + dy * dy) - r


def _square(dx, dy, r):
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r  # same area feel as the circle


def _triangle(dx, dy, r):
    # upward isosceles triangle: apex (0, -r), base y = +0.8 r, half-width r at the base
    base = dy - 0.8 * r
    slope = (np.abs(dx) * 1.8 * r - (dy + r) * r) / np.sqrt((1.8 * r) ** 2 + r * r)
    return np.maximum(base, slope)


def _cross(dx, dy, r):
    arm = 0.33 * r
    horizontal = np.maximum(np.abs(dx) - r, np.abs(dy) - arm)
    vertical = np.maximum(np.abs(dx) - arm, np.abs(dy) - r)
    return np.minimum(horizontal, vertical)


SHAPE_RENDERERS = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross}
