"""Catalog sources: list products and their image files without reading the images.

Three layouts: a folder per product, a manifest (CSV or JSON Lines), and Amazon Berkeley
Objects (ABO). Listing is cheap metadata work on the driver; reading and decoding the images
happens in a Spark UDF (etl.ingest).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from etl.product_types import catalog_type

FORMATS = ("folder", "manifest", "abo")
PRODUCT_FILE = "product.json"
MANIFEST_REQUIRED = ("product_id", "image")


@dataclass
class Product:
    product_id: str
    title: str | None = None
    product_type: str | None = None
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRef:
    product_id: str
    source_uri: str


@dataclass(frozen=True)
class Rejected:
    product_id: str
    source_uri: str
    reason_code: str
    reason: str


@dataclass
class Listing:
    source: str  # "<format>:<path>", recorded on every row
    products: dict[str, Product] = field(default_factory=dict)
    images: list[ImageRef] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def add_product(self, product_id: str, where: str) -> Product | None:
        """The product with this id, or None (and a quarantine row) when the id is unsafe."""
        problem = unsafe_product_id(product_id)
        if problem:
            self.rejected.append(Rejected(product_id, where, "unsafe_product_id", problem))
            return None
        return self.products.setdefault(product_id, Product(product_id))


def unsafe_product_id(product_id: str) -> str | None:
    """Why this id cannot be used as a key and a path component, or None when it can."""
    if not product_id or not product_id.strip():
        return "the product id is empty; give every product an id"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in product_id):
        return f"the product id {product_id!r} contains control characters; remove them"
    if "/" in product_id or "\\" in product_id:
        return f"the product id {product_id!r} contains a path separator; use another id"
    if product_id in (".", "..") or ".." in product_id:
        return f"the product id {product_id!r} contains '..'; use another id"
    if product_id != product_id.strip():
        return f"the product id {product_id!r} has leading or trailing spaces; trim it"
    if len(product_id) > 256:
        return "the product id is longer than 256 characters"
    return None


def detect_format(source: Path) -> str:
    if (source / "listings" / "metadata").is_dir():
        return "abo"
    if source.is_file():
        return "manifest"
    return "folder"


def list_source(source: str | Path, fmt: str | None = None) -> Listing:
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise UserError(f"source not found: {path}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown source format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return {"folder": list_folder, "manifest": list_manifest, "abo": list_abo}[fmt](path)


# --- folder: <source>/<product_id>/**/<image files>, optional product.json ------------------


def list_folder(root: Path) -> Listing:
    if not root.is_dir():
        raise UserError(f"folder source must be a directory: {root}")
    listing = Listing(f"folder:{root}")
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store, .git and the like are not catalog content
        if not entry.is_dir():
            listing.rejected.append(
                Rejected("", str(entry), "outside_product_folder",
                         "files must sit inside a folder named after their product id")
            )
            continue
        product = listing.add_product(entry.name, str(entry))
        if product is None:
            continue
        meta_file = entry / PRODUCT_FILE
        if meta_file.exists():
            _read_product_json(meta_file, product, listing)
        for file in sorted(p for p in entry.rglob("*") if p.is_file()):
            if file == meta_file or any(part.startswith(".") for part in file.relative_to(entry).parts):
                continue
            listing.images.append(ImageRef(product.product_id, str(file)))
    return listing


def _read_product_json(meta_file: Path, product: Product, listing: Listing) -> None:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("the top level must be an object")
    except (ValueError, UnicodeDecodeError) as err:
        listing.rejected.append(
            Rejected(product.product_id, str(meta_file), "invalid_metadata",
                     f"{PRODUCT_FILE} is not a JSON object ({err}); the product was ingested without it")
        )
        return
    product.title = _text(meta.pop("title", None))
    product.product_type = _text(meta.pop("product_type", None))
    product.attributes = meta


# --- manifest: CSV or JSON Lines with product_id, title, product_type, image -----------------


def list_manifest(manifest: Path) -> Listing:
    listing = Listing(f"manifest:{manifest}")
    for line_no, row in _manifest_rows(manifest):
        where = f"{manifest}:{line_no}"
        product_id, image = _text(row.pop("product_id", None)) or "", _text(row.pop("image", None))
        product = listing.add_product(product_id, where)
        if product is None:
            continue
        title, product_type = _text(row.pop("title", None)), _text(row.pop("product_type", None))
        product.title = product.title or title
        product.product_type = product.product_type or product_type
        for key, value in row.items():
            if value not in (None, ""):
                product.attributes.setdefault(key, value)
        if not image:
            listing.rejected.append(Rejected(product_id, where, "missing_image", "the row names no image"))
            continue
        image_path = Path(image).expanduser()
        listing.images.append(ImageRef(product_id, str(image_path if image_path.is_absolute()
                                                          else (manifest.parent / image_path).resolve())))
    return listing


def _manifest_rows(manifest: Path):
    text = manifest.read_text(encoding="utf-8-sig")
    if manifest.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"{manifest}:{line_no}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise UserError(f"{manifest}:{line_no}: each line must be a JSON object")
            rows.append((line_no, row))
        columns = set().union(*(r.keys() for _, r in rows)) if rows else set()
    elif manifest.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if manifest.suffix.lower() == ".tsv" else ",")
        rows = [(line_no, dict(row)) for line_no, row in enumerate(reader, start=2)]
        columns = set(reader.fieldnames or ())
    else:
        raise UserError(f"manifest must be .csv, .tsv or .jsonl: {manifest}")
    missing = [c for c in MANIFEST_REQUIRED if c not in columns]
    if missing:
        raise UserError(f"{manifest}: missing column(s) {', '.join(missing)}; "
                        f"expected product_id, title, product_type, image")
    return rows


# --- ABO: listings/metadata/listings_*.json.gz + images/metadata/images.csv.gz ---------------

ABO_SKIP = {"item_id", "item_name", "product_type", "main_image_id", "other_image_id", "node",
            "spin_id", "3dmodel_id", "domain_name", "marketplace", "country"}


def list_abo(root: Path) -> Listing:
    listing = Listing(f"abo:{root}")
    images_csv = root / "images" / "metadata" / "images.csv.gz"
    if not images_csv.exists():
        raise UserError(f"ABO layout without {images_csv}")
    with gzip.open(images_csv, "rt", encoding="utf-8") as fh:
        image_paths = {row["image_id"]: row["path"] for row in csv.DictReader(fh)}
    listing_files = sorted((root / "listings" / "metadata").glob("listings_*.json.gz"))
    if not listing_files:
        raise UserError(f"no listings_*.json.gz under {root / 'listings' / 'metadata'}")
    for listing_file in listing_files:
        with gzip.open(listing_file, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    _abo_item(json.loads(line), f"{listing_file}:{line_no}", root, image_paths, listing)
    return listing


def _abo_item(item: dict, where: str, root: Path, image_paths: dict, listing: Listing) -> None:
    product = listing.add_product(str(item.get("item_id", "")), where)
    if product is None:
        return
    product.title = product.title or _english(item.get("item_name"))
    code = _english(item.get("product_type"))
    if code:  # "CHAIR" -> chair; a department ("HOME_BED_AND_BATH") leaves the type to the title
        product.attributes.setdefault("abo_product_type", code)
        product.product_type = product.product_type or catalog_type(code)
    for key, value in item.items():
        if key not in ABO_SKIP and key not in product.attributes:
            text = _english(value)
            if text is not None:
                product.attributes[key] = text
    for image_id in [item.get("main_image_id"), *item.get("other_image_id", [])]:
        if not image_id:
            continue
        if image_id not in image_paths:
            listing.rejected.append(Rejected(product.product_id, f"{where}#{image_id}", "unknown_image_id",
                                             f"image id {image_id} is not in images.csv.gz"))
            continue
        small = root / "images" / "small" / image_paths[image_id]
        uri = str(small if small.exists() else root / "images" / "original" / image_paths[image_id])
        listing.images.append(ImageRef(product.product_id, uri))  # repeats are dropped in ingest


def _english(value) -> str | None:
    """ABO text fields are lists of {language_tag, value}: prefer English, else the first."""
    if isinstance(value, list):
        entries = [v for v in value if isinstance(v, dict) and "value" in v]
        if not entries:
            return None
        english = [v for v in entries if str(v.get("language_tag", "")).lower().startswith("en")]
        return _text((english or entries)[0]["value"])
    return value if isinstance(value, str) else None


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
