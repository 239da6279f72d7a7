"""Test access to the seeded random checkpoints, which live in mpk.synthetic for the demo too."""

from mpk.synthetic import make_checkpoint, reference_model

__all__ = ["make_checkpoint", "reference_model"]
