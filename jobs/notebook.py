"""What the notebooks in notebooks/ share: opening a home, SQL as pandas, tables and image grids.

    from jobs.notebook import fmt, open_home, show, thumbnails
    lake, sql = open_home(HOME)
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Callable

import pandas as pd
from PIL import Image

from etl.lakehouse import Lakehouse
from etl.report import honesty_notice


def open_home(home) -> tuple[Lakehouse, Callable[[str], pd.DataFrame]]:
    """The lakehouse at `home` and a `sql(query)` returning pandas; prints the home and what no
    figure can show (tiny random-weight models, synthetic ratings), and widens pandas' display."""
    pd.set_option("display.max_columns", 50)
    pd.set_option("display.max_colwidth", 80)
    pd.set_option("display.width", 200)
    lake = Lakehouse.open(home)
    print(f"recontext home: {lake.settings.home}")
    notice = honesty_notice(lake)
    if notice:
        print(f"NOTE: {notice}")
    return lake, lambda query: lake.spark.sql(query).toPandas()


def show(frame, empty: str = "no rows yet") -> None:
    """Display a table, or say that there is nothing to show."""
    from IPython.display import display

    if frame is None or len(frame) == 0:
        print(empty)
    else:
        display(frame)


def fmt(value, digits: int = 3) -> str:
    """A short text for a caption: NULL/NaN as '-', floats rounded."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def decode(data) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, WEBP) as a PIL image."""
    image = Image.open(io.BytesIO(bytes(data)))
    image.load()
    return image


def thumbnails(items, columns: int = 6, size: float = 2.3, title: str | None = None,
               empty: str = "no rows yet", limit: int | None = None) -> None:
    """A grid of (encoded image or None, caption) pairs, drawn with matplotlib."""
    import matplotlib.pyplot as plt

    items = list(items)
    if not items:
        print(empty)
        return
    if limit is not None and len(items) > limit:
        print(f"showing {limit} of {len(items)} images")
        items = items[:limit]
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, (size + 0.7) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (data, caption) in zip(axes.flat, items):
        if data is not None:
            image = decode(data)
            if image.mode in ("1", "L", "I", "I;16", "F"):
                ax.imshow(image.convert("L"), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image.convert("RGBA"))
        else:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", color="grey")
        wrapped = "\n".join(textwrap.fill(line, 36) for line in str(caption).split("\n"))
        ax.set_title(wrapped, fontsize=7)
    fig.tight_layout()
    if title:  # above the captions: the inline backend crops the figure to what is drawn
        fig.suptitle(title, y=1.0 + 0.25 / rows, fontsize=11)
    plt.show()
