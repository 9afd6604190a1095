"""The demo's sample catalog, written at run time from real photos that installed packages ship.

Nothing is vendored: scikit-image ships the coffee cup (CC0), the two motorcycle views
(Middlebury 2014 stereo) and the rocket (public domain); matplotlib ships the gift box
(openclipart), whose alpha channel is a true product mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_PRODUCTS = {
    "coffee-cup": {"title": "Ceramic coffee cup on saucer", "product_type": "coffee cup",
                   "attributes": {"color": "white", "material": "ceramic"}},
    "motorcycle": {"title": "Red sport motorcycle", "product_type": "motorcycle",
                   "attributes": {"color": "red"}},
    # Two products come without a type, as in many catalogs: classification finds the gift box's
    # in its title; the rocket's title names no type and the tiny random CLIP cannot tell, so it is
    # `unknown` and the generic seed scenes serve it.
    "rocket": {"title": "Launch vehicle scale model", "product_type": None,
               "attributes": {"color": "white"}},
    "gift-box": {"title": "Blue gift box with ribbon", "product_type": None,
                 "attributes": {"color": "blue", "license": "openclipart"}},
}


def _photos() -> dict[str, dict[str, np.ndarray]]:
    from matplotlib import cbook
    from skimage import data

    left, right, _ = data.stereo_motorcycle()
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as fh:
        present = np.asarray(Image.open(fh).convert("RGBA"))
    return {
        "coffee-cup": {"coffee.png": data.coffee()},
        "motorcycle": {"left.png": left, "right.png": right},
        "rocket": {"rocket.png": data.rocket()},
        "gift-box": {"present.png": present},
    }


def write_sample_catalog(folder: Path) -> Path:
    """Write the sample catalog in the folder layout (idempotent: same bytes every time)."""
    folder = Path(folder)
    for product_id, photos in _photos().items():
        product_dir = folder / product_id
        product_dir.mkdir(parents=True, exist_ok=True)
        meta = SAMPLE_PRODUCTS[product_id]
        (product_dir / "product.json").write_text(
            json.dumps({"title": meta["title"], **({"product_type": meta["product_type"]} if meta["product_type"]
                                                   else {}), **meta["attributes"]}, indent=2))
        for name, pixels in photos.items():
            Image.fromarray(pixels).save(product_dir / name)
    return folder
