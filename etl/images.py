"""Decode, validate and normalize one image file.

Valid but unusual images (CMYK, 16-bit, palette, RGBA, EXIF-rotated, very large) are normalized
and kept; unusable ones raise `RejectedImage` with a reason a person can act on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.settings import IngestSettings
from udfs.imaging import encode_png, pixel_hash

# Formats decoded and kept; the first three are stored with their original bytes when
# nothing had to change, everything else is re-encoded as PNG.
KEEP_AS_IS = {"JPEG", "PNG", "WEBP"}
SUPPORTED = KEEP_AS_IS | {"MPO", "GIF", "BMP", "TIFF"}
EXIF_ORIENTATION = 0x0112


class RejectedImage(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class NormalizedImage:
    image_id: str
    data: bytes
    format: str
    width: int
    height: int
    has_alpha: bool
    original_format: str
    normalization: str  # comma-separated list of what changed


def normalize_image(raw: bytes, limits: IngestSettings) -> NormalizedImage:
    if not raw:
        raise RejectedImage("empty_file", "the file is empty (0 bytes); re-export or re-download it")
    if len(raw) > limits.max_file_bytes:
        raise RejectedImage(
            "file_too_large",
            f"the file is {len(raw) / 2**20:.0f} MiB, over max_file_bytes "
            f"({limits.max_file_bytes / 2**20:.0f} MiB); downscale it before ingest",
        )
    head = raw[:512].lstrip().lower()
    if head.startswith(b"<?xml") or b"<svg" in head:
        raise RejectedImage(
            "unsupported_format", "SVG (vector) images are not supported; rasterize it to PNG or JPEG"
        )
    image = _open(raw, limits)
    original_format = image.format or "UNKNOWN"
    changes: list[str] = []

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        changes.append("first_frame")
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
        changes.append("exif_orientation")
    image, converted = _to_rgb_or_rgba(image)
    if converted:
        changes.append(converted)

    width, height = image.size
    if min(width, height) < limits.min_side:
        raise RejectedImage(
            "too_small",
            f"{width}x{height} px is below the minimum side of {limits.min_side} px; "
            "supply a larger photo",
        )
    if max(width, height) > limits.max_side:
        image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        width, height = image.size
        changes.append(f"downscaled_to_{limits.max_side}")

    if not changes and original_format in KEEP_AS_IS:
        data, fmt = raw, original_format
    else:
        data, fmt = encode_png(image), "PNG"

    return NormalizedImage(
        image_id=pixel_hash(image),
        data=data,
        format=fmt,
        width=width,
        height=height,
        has_alpha=image.mode == "RGBA",
        original_format=original_format,
        normalization=",".join(changes),
    )


def _open(raw: bytes, limits: IngestSettings) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow warns past it, and refuses past twice it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb(str(err), limits) from None
    except UnidentifiedImageError:
        raise RejectedImage(
            "undecodable", "not a recognizable image (unknown format or corrupt header); re-export it"
        ) from None
    if image.format not in SUPPORTED:
        raise RejectedImage(
            "unsupported_format",
            f"{image.format} images are not supported; convert to PNG or JPEG (supported: "
            f"{', '.join(sorted(SUPPORTED))})",
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _bomb(f"{width}x{height} = {width * height / 1e6:.0f} megapixels", limits)
    try:
        image.load()
    except OSError as err:
        code = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise RejectedImage(code, f"the image data is {code} ({err}); re-export or re-download it") from None
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds on corrupt data
        raise RejectedImage("undecodable", f"the image data is corrupt ({err}); re-export it") from None
    return image


def _bomb(detail: str, limits: IngestSettings) -> RejectedImage:
    return RejectedImage(
        "decompression_bomb",
        f"{detail} exceeds max_pixels ({limits.max_pixels / 1e6:.0f} megapixels), a possible "
        "decompression bomb; downscale it before ingest or raise ingest.max_pixels",
    )


def _to_rgb_or_rgba(image: Image.Image) -> tuple[Image.Image, str]:
    """Bring any mode to RGB, or RGBA when the alpha channel carries information."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or pixels.max() > 255 else 255.0
        eight_bit = np.clip(np.rint(pixels * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB"), f"{mode}_to_8bit"
    if mode == "P" and "transparency" in image.info or mode in ("LA", "PA", "RGBa", "La"):
        image, converted = image.convert("RGBA"), f"{mode}_to_RGBA"
    elif mode not in ("RGB", "RGBA"):
        return image.convert("RGB"), f"{mode}_to_RGB"
    else:
        converted = ""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB"), "opaque_alpha_dropped"
    return image, converted
