"""The embedded benchmark world: procedurally rendered captioned scenes with object and scene labels."""

from .world import World

__all__ = ["World"]
