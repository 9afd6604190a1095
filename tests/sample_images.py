"""Image files the tests generate: valid-but-unusual ones and every kind of bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth RGB picture with some texture (distinct per seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, rng.integers(0, 255))], axis=-1)
    noise = rng.integers(0, 30, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def unusual_images() -> dict[str, bytes]:
    """Valid images that must be normalized and kept."""
    rgba = photo(200, 160, seed=3).convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (40, 30, 160, 130))
    rgba.putalpha(alpha)
    sixteen = Image.fromarray((np.arange(200 * 100, dtype=np.uint32).reshape(100, 200) * 3 % 65536)
                              .astype(np.uint16))
    palette = photo(150, 120, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rotated = photo(300, 100, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return {
        "plain.jpg": encode(photo(320, 240, seed=1), "JPEG", quality=90),
        "cmyk.jpg": encode(photo(200, 150, seed=2).convert("CMYK"), "JPEG"),
        "sixteen_bit.png": encode(sixteen, "PNG"),
        "palette.png": encode(palette, "PNG"),
        "alpha.png": encode(rgba, "PNG"),
        "rotated.jpg": encode(rotated, "JPEG", exif=exif.tobytes()),
        "huge.png": encode(photo(3000, 900, seed=6), "PNG", compress_level=1),
        "photo.webp": encode(photo(256, 256, seed=7), "WEBP", quality=80),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Unusable files and the reason code each must be quarantined with."""
    jpeg = encode(photo(400, 300, seed=8), "JPEG")
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")  # 144 MP in a few KB
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    return {
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "garbage.png": (bytes(range(256)) * 8, "undecodable"),
        "vector.svg": (svg, "unsupported_format"),
        "bomb.png": (bomb, "decompression_bomb"),
        "tiny.png": (encode(photo(32, 32), "PNG"), "too_small"),
        "notes.txt": (b"not an image at all\n", "undecodable"),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def product_shot(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A coloured object on a plain light background: something a salient-object model finds."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (235, 235, 230))
    colour = tuple(int(c) for c in rng.integers(20, 200, size=3))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=colour)
    return image


def cli_env(remote=None, env=None) -> dict:
    """The environment of a `recontext` process: this one's, offline, on the Spark Connect server
    `remote` (else the embedded engine), plus `env`."""
    import os

    out = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    out.pop("SPARK_REMOTE", None)
    if remote:
        out["SPARK_REMOTE"] = remote
    # tracking.configure() in this process sets it to the home it configured: a child process
    # would register its adapters in that home's store instead of its own.
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def recontext(*args, home, timeout=1200, remote=None, env=None):
    """The `recontext` command in a new process, as a user runs it (see cli_env)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jobs.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(remote, env))
