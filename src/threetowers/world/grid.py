"""A PNG grid of images with a line of text over each, for looking at the world (`World.show`)."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state

from ..core.atomic import atomic_path


def write_grid(path: str, images: np.ndarray, texts: list[tuple[str, str]]) -> None:
    """One tile per (text, colour) in `texts`, 4 to a row, written atomically to `path`."""
    n = len(texts)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 3.0 * rows), dpi=100)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(texts[i][0], 30)), fontsize=7, color=texts[i][1])
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
