import io

import numpy as np
import pytest
from PIL import Image

from core.settings import IngestSettings
from etl.images import RejectedImage, normalize_image
from sample_images import bad_files, encode, photo, unusual_images

LIMITS = IngestSettings(max_side=2048, min_side=64, max_pixels=64_000_000)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def normalized():
    return {name: normalize_image(data, LIMITS) for name, data in unusual_images().items()}


def test_plain_jpeg_is_kept_byte_for_byte(normalized):
    plain = normalized["plain.jpg"]
    assert plain.data == unusual_images()["plain.jpg"]
    assert (plain.format, plain.width, plain.height, plain.normalization) == ("JPEG", 320, 240, "")


def test_cmyk_becomes_rgb_png(normalized):
    image = normalized["cmyk.jpg"]
    assert image.format == "PNG" and decode(image.data).mode == "RGB"
    assert "CMYK_to_RGB" in image.normalization


def test_sixteen_bit_is_scaled_not_clipped(normalized):
    image = normalized["sixteen_bit.png"]
    pixels = np.asarray(decode(image.data).convert("L"), dtype=np.int32)
    source = np.asarray(Image.open(io.BytesIO(unusual_images()["sixteen_bit.png"])), dtype=np.int64)
    assert np.abs(pixels - np.rint(source * 255 / 65535)).max() <= 1
    assert pixels.max() > 200  # clipping 16-bit values to 8 bits would saturate, not scale


def test_palette_becomes_rgb(normalized):
    image = normalized["palette.png"]
    assert decode(image.data).mode == "RGB" and not image.has_alpha


def test_rgba_keeps_its_alpha_as_mask_hint(normalized):
    image = normalized["alpha.png"]
    assert image.has_alpha and image.format == "PNG"
    alpha = np.asarray(decode(image.data).getchannel("A"))
    assert alpha[50, 50] == 255 and alpha[0, 0] == 0


def test_exif_orientation_is_applied(normalized):
    image = normalized["rotated.jpg"]
    assert (image.width, image.height) == (100, 300)
    assert "exif_orientation" in image.normalization and image.format == "PNG"


def test_large_images_are_downscaled(normalized):
    image = normalized["huge.png"]
    assert max(image.width, image.height) == 2048 and image.width == 2048
    assert abs(image.height - round(900 * 2048 / 3000)) <= 1


def test_webp_is_kept(normalized):
    assert normalized["photo.webp"].format == "WEBP"


def test_opaque_alpha_is_dropped():
    image = normalize_image(encode(photo(100, 100).convert("RGBA"), "PNG"), LIMITS)
    assert not image.has_alpha and "opaque_alpha_dropped" in image.normalization


def test_image_id_hashes_pixels_not_file_bytes():
    pixels = photo(120, 90, seed=9)
    as_png = normalize_image(encode(pixels, "PNG"), LIMITS)
    as_png_other_level = normalize_image(encode(pixels, "PNG", compress_level=0), LIMITS)
    assert as_png.image_id == as_png_other_level.image_id
    assert as_png.image_id != normalize_image(encode(photo(120, 90, seed=10), "PNG"), LIMITS).image_id


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_are_rejected_with_reason(name):
    data, code = bad_files()[name]
    with pytest.raises(RejectedImage) as err:
        normalize_image(data, LIMITS)
    assert err.value.code == code
    assert len(err.value.reason) > 20  # a sentence a person can act on


def test_file_size_limit():
    with pytest.raises(RejectedImage) as err:
        normalize_image(encode(photo(), "PNG"), IngestSettings(max_file_bytes=1000))
    assert err.value.code == "file_too_large"
