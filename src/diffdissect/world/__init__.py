"""The shapes world: procedural images with known factors, its trained toy pipeline and classifiers
(committed under world/weights), and its preset of every analysis (captioner, classifier specs, inverters,
store helpers, directions preset, the demo). The analyses never import this package; it imports them.

Start from `ShapesWorld.load()`.
"""

from diffdissect.world.shapes import HELD_OUT_SEED, ShapesWorld

__all__ = ["HELD_OUT_SEED", "ShapesWorld"]
