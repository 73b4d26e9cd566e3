"""Image cleaning, run in worker processes: one source file in, one square RGB PNG (or a drop reason) out.

- Read: a PNG with Pillow; an SVG rendered by `rsvg-convert` (librsvg2-bin) to fit a box of
  `SVG_BOX` x the image size, aspect kept, language fixed to English (SVGs may switch text by the
  environment's language). An openclipart PNG over `MAX_PIXELS` (a few are 16,000 px pages: decoding one
  costs 0.7 GB and seconds) or under half the image size (thumbnails of 3 to 60 px) is replaced by its
  SVG source rendered at that box: the same drawing, at a useful resolution.
- Composite the alpha channel onto white, so transparent drawings are drawn on white like the others.
- Crop to the drawing's bounding box: the pixels with some channel under `WHITE` (many openclipart PNGs
  are A4 pages with a small drawing in the middle). The box is found on a copy reduced to about 1,000
  px, so a large page costs one decode; the crop is taken from the full image.
- Scale the crop so its longer side fills the image less a `MARGIN` on each side, with antialiasing
  (Lanczos), and centre it on a white square of the image size.

Unreadable files (broken PNG, failed render, too large without an SVG) are "unreadable_image"; a
drawing with no non-white pixel is "blank_image". The output depends only on the file and the size.
"""

from __future__ import annotations

import io
import subprocess
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 16_000_000   # larger PNGs are rendered from their SVG (when they have one) or dropped
SVG_BOX = 8               # SVGs are rendered to fit SVG_BOX x image size: detail left after cropping
WHITE = 240               # a pixel whose every channel is at least this is background
MARGIN = 0.04             # white border around the drawing, as a fraction of the image size
RSVG_TIMEOUT = 60         # seconds for one SVG


class Unreadable(Exception):
    pass


def render_svg(path: str, box: int) -> Image.Image:
    try:
        done = subprocess.run(["rsvg-convert", "--accept-language", "en", "-a", "-w", str(box), "-h", str(box), path],
                              capture_output=True, timeout=RSVG_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unreadable(str(err)) from None
    if done.returncode != 0 or not done.stdout:
        raise Unreadable(done.stderr.decode(errors="replace"))
    image = Image.open(io.BytesIO(done.stdout))
    image.load()
    return image


def load(path: str, svg: str, size: int) -> Image.Image:
    if path.endswith(".svg"):
        return render_svg(path, SVG_BOX * size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
            width, height = image.size
        except Image.DecompressionBombError:
            width = height = MAX_PIXELS  # far too large: only its SVG can be used
            image = None
        unusable = width * height > MAX_PIXELS or max(width, height) < size // 2
        if svg and unusable:
            return render_svg(svg, SVG_BOX * size)
        if image is None or width * height > MAX_PIXELS:
            raise Unreadable(f"{path}: {width} x {height} pixels")
        image.load()
    return image


def on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def drawing_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the non-white pixels of an RGB image, or None when it is blank."""
    factor = max(1, max(image.size) // 1024)
    small = image.reduce(factor) if factor > 1 else image
    ink = np.asarray(small).min(axis=2) < WHITE
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return None
    width, height = image.size
    return (cols[0] * factor, rows[0] * factor, min(width, (cols[-1] + 1) * factor),
            min(height, (rows[-1] + 1) * factor))


def square_drawing(image: Image.Image, size: int) -> Image.Image | None:
    """The drawing cropped to its box, scaled to fill `size` less the margin, centred on white; None if blank."""
    image = on_white(image)
    box = drawing_box(image)
    if box is None:
        return None
    crop = image.crop(box)
    inner = size - 2 * round(MARGIN * size)
    scale = inner / max(crop.size)
    width, height = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    crop = crop.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(crop, ((size - width) // 2, (size - height) // 2))
    return canvas


def process(job: tuple[str, str, int]) -> tuple[bytes, str]:
    """(PNG bytes, "") or (b"", drop reason) for one (image path, SVG fallback, size)."""
    path, svg, size = job
    try:
        image = load(path, svg, size)
        square = square_drawing(image, size)
    except (OSError, ValueError, Unreadable, Image.DecompressionBombError):
        return b"", "unreadable_image"
    if square is None:
        return b"", "blank_image"
    out = io.BytesIO()
    square.save(out, format="PNG")
    return out.getvalue(), ""
