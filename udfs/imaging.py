"""Pixels in and out of the binary columns, shared by every model role."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)  # transparent pixels and removed backgrounds become white


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; transparent areas are composited onto white."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def padded_square(image: Image.Image, size: int) -> Image.Image:
    """`size` x `size`: the long side resized to `size`, the short side padded on both ends with
    the median colour of the photo's border (product shots have plain backgrounds), so wide and
    tall products keep their ends."""
    rgb = image.convert("RGB")
    scale = size / max(rgb.size)
    fitted = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    pixels = np.asarray(rgb)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in np.median(border, axis=0)))
    canvas.paste(rgb.resize(fitted, Image.Resampling.LANCZOS), ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
    return canvas


def alpha_mask(data: bytes) -> np.ndarray | None:
    """The alpha channel as a boolean mask (alpha >= 128), or None when the image has none."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return None
    return np.asarray(image.convert("RGBA").getchannel("A")) >= 128


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_png(Image.fromarray(mask.astype(np.uint8) * 255, "L"))


def decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) >= 128


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] of the mask's pixels, end-exclusive; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def segment(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The product alone: background replaced by white, cropped to the mask's box.

    This is the input of the segmented metrics (MultiBooth): the same embedding models see
    only the product, so the background cannot raise or lower the score.
    """
    if mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size)) >= 128
    box = mask_box(mask)
    if box is None:
        raise ValueError("the mask is empty: no product pixels to segment")
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = BACKGROUND
    return Image.fromarray(pixels).crop(box)


def without_product(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The scene alone: the product's pixels, its mask dilated by 2% of the image's long side (so
    no outline is left), filled with the mean colour of the rest. The input of background
    CLIP-T, which then measures the scene apart from the product."""
    from scipy.ndimage import binary_dilation

    if mask.shape != (image.height, image.width):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size)) >= 128
    if not mask.any():
        raise ValueError("the mask is empty: no product to mask out")
    grow = max(1, round(0.02 * max(image.size)))
    product = binary_dilation(mask, iterations=grow)
    pixels = np.asarray(image.convert("RGB")).copy()
    if product.all():
        raise ValueError("the product fills the image: no background to embed")
    pixels[product] = pixels[~product].mean(axis=0).round().astype(np.uint8)
    return Image.fromarray(pixels)


def pixel_hash(image: Image.Image) -> str:
    """The image_id of every stored image: sha256 of mode, size and raw pixels (not file bytes)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()
