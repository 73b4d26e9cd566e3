"""From image bytes or files to the model's input convention: float `[3, S, S]` in [0, 1].

Two steps, used by every real-data reader (webdataset shards, CSV files, image folders):

- `decode_rgb` opens an image defensively: it refuses decompression bombs and broken files with
  an `ImageError` that says why (`reason`), shrinks very large images early (JPEG `draft`
  decodes at 1/2, 1/4 or 1/8 scale for almost nothing), and converts every convertible mode to
  8-bit RGB: grayscale, palette, CMYK, 16-bit (scaled, not clipped), and transparent images
  (composited on white, the usual background of web images with alpha).
- `image_transform` resizes and crops with torchvision.transforms.v2. There is no normalisation
  here: each tower normalises its own input.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

# Pillow's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS), about 89.5 million pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Longest side over shortest side beyond which an image is refused: resizing the short side to the
# training size would make the other side huge (a 1x5000 banner at 224 px is 224x1,120,000 pixels).
MAX_ASPECT = 20.0
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is a short machine-readable cause (counted per reason)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Pickle (on_main sends rank 0's errors to the other ranks) would call __init__ with the message alone.
        return type(self), (self.reason, self.detail), self.__dict__


class ImageError(SampleError):
    """A sample whose image cannot be used."""


def image_transform(image_size: int, augment: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> float tensor `[3, image_size, image_size]` in [0, 1].

    Without augmentation: resize the shorter side to `image_size`, then center-crop.
    With augmentation: a random resized crop covering 80-100% of the image. Deliberately no
    horizontal flip: captions say "left of" and "right of", and a flip would make them wrong.
    """
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be > 0")
    if augment:
        geometry = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
    else:
        geometry = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    # Resizing uint8 tensors is the fast path in torchvision; convert to float only at the end.
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


def decode_rgb(
    source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, keep_side: int = 0,
    max_aspect: float = MAX_ASPECT,
) -> Image.Image:
    """Open an image (bytes or a file path) as 8-bit RGB, or raise `ImageError`.

    `max_pixels`: refuse images with more pixels than this (reason `too_large`). Pillow's own hard
    limit, 2 x `PIL.Image.MAX_IMAGE_PIXELS`, still applies above that.
    `keep_side`: if > 0, shrink early (before conversion and cropping) while keeping the shorter
    side at least this long; pass about twice the training size so crops stay sharp.
    `max_aspect`: refuse images whose long side is more than this times the short one (reason
    `bad_aspect`), checked from the header before decoding; with it the resized image is bounded too
    (at most max_aspect x S x S pixels).
    Reasons: unreadable_file, corrupt_image, truncated_image, too_large, bad_aspect, unsupported_mode.
    """
    try:
        stream = open(source, "rb") if isinstance(source, (str, Path)) else io.BytesIO(source)
    except OSError as err:
        raise ImageError("unreadable_file", f"{type(err).__name__}: {err}") from None
    with stream:
        try:
            with warnings.catch_warnings():
                # We apply our own limit below; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream)
        except Image.DecompressionBombError as err:
            raise ImageError("too_large", str(err)) from None
        except Exception as err:  # Pillow raises many types for undecodable headers
            raise ImageError("corrupt_image", f"{type(err).__name__}: {err}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError("too_large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
        if max(width, height) > max_aspect * max(1, min(width, height)):
            raise ImageError("bad_aspect", f"{width}x{height}: aspect ratio above {max_aspect:g}:1")
        if keep_side and img.format == "JPEG":
            img.draft(img.mode, (keep_side, keep_side))  # decode at a reduced scale, never below keep_side
        try:
            img.load()
        except Exception as err:
            reason = "truncated_image" if "truncated" in str(err) else "corrupt_image"
            raise ImageError(reason, f"{type(err).__name__}: {err}") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)  # phone photos store their rotation in EXIF
    except Exception:  # a malformed EXIF block does not spoil the pixels; keep them as stored
        pass
    img = to_rgb(img)
    short = min(img.size)
    if keep_side and short > 2 * keep_side:
        scale = keep_side / short
        size = (max(keep_side, round(img.width * scale)), max(keep_side, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode with a sensible RGB meaning to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT:
        # 0..65535 -> 0..255 by scaling; Pillow's own convert would clip at 255 and go white.
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise ImageError("unsupported_mode", "floating-point image (mode F) has no defined 8-bit range")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as err:
        raise ImageError("unsupported_mode", f"cannot convert mode {mode} to RGB: {err}") from None
