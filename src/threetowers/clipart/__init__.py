"""A real human-captioned image-text benchmark from installed clip-art packages: openclipart, Tux Paint
stamps and the Google / Twitter emoji, as img2dataset training shards and CLIP_benchmark test sets
(`threetowers prepare clipart OUT_DIR`)."""

from .build import OutputExistsError, prepare_clipart
from .sources import MissingSourceError

__all__ = ["MissingSourceError", "OutputExistsError", "prepare_clipart"]
