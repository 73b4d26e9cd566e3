"""Everything about the frozen third tower h: the source registry and the built-in sources, the
`ThirdTower` module, its fingerprint, and the store of its embeddings (training cache and
evaluation features).

Importing this package registers the built-in sources, so `source_names()` is complete whenever
it can be called.
"""

from . import sources  # noqa: F401  (the built-in sources register themselves)
from .registry import FrozenImageModel, Preprocessing, list_sources, register_source, source_names
from .tower import ThirdTower, check_same_third, load_third_tower

__all__ = ["FrozenImageModel", "Preprocessing", "ThirdTower", "check_same_third", "list_sources", "load_third_tower",
           "register_source", "source_names"]
