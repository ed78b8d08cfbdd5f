"""incontext.imageio: decoding and encoding (output sizing: test_imageio_sizing.py). Images are built in memory."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from incontext import imageio
from incontext.errors import ImageTooLarge, IncontextError, InvalidImage, InvalidInput, UnsupportedFormat
from incontext.imageio import (
    content_type,
    decode_base64_image,
    decode_data_uri,
    decode_image,
    encode_image,
    format_from_suffix,
    load_image,
    to_data_uri,
)
from incontext.testing import close, two_tone

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A real 1x1 PNG whose IHDR (with a valid CRC) claims w x h."""
    data = bytearray(save(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("fmt", "kw", "tol"),
    [
        ("JPEG", {"quality": 95}, 12),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),
        ("AVIF", {"quality": 95}, 12),
    ],
)
def test_accepted_formats_decode_to_rgb(fmt, kw, tol):
    img = decode_image(save(two_tone(), fmt, **kw))
    assert img.mode == "RGB"
    assert img.size == (40, 20)
    assert close(img.getpixel((5, 10)), RED, tol)
    assert close(img.getpixel((35, 10)), BLUE, tol)
    assert img.info == {}


def test_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert decode_image(data).getpixel((4, 4)) == RED


def test_mpo_jpeg_is_accepted():
    # Phones write JPEGs with extra pictures; Pillow names them MPO.
    data = save(Image.new("RGB", (8, 8), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)])
    assert close(decode_image(data).getpixel((4, 4)), RED, 12)


def test_exif_orientation_6_rotates_clockwise():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(save(two_tone(40, 20), "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    assert close(img.getpixel((10, 5)), RED, 12)  # the left half is now on top
    assert close(img.getpixel((10, 35)), BLUE, 12)


# ------------------------------------------------------------------------------ modes


def test_rgba_transparent_pixel_becomes_white():
    src = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    src.putpixel((0, 0), (0, 0, 0, 0))
    src.putpixel((1, 0), (0, 0, 0, 128))
    img = decode_image(save(src, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert close(img.getpixel((1, 0)), (127, 127, 127), 1)  # half-transparent black on white
    assert img.getpixel((2, 2)) == RED


def test_a_logo_keeps_its_transparency_when_asked():
    src = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    src.putpixel((1, 0), (0, 0, 0, 128))
    img = decode_image(save(src, "PNG"), keep_alpha=True)
    assert img.mode == "RGBA" and img.getpixel((1, 0)) == (0, 0, 0, 128) and img.getpixel((2, 2)) == (255, 0, 0, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    assert decode_image(save(palette, "PNG", transparency=0), keep_alpha=True).getpixel((0, 0)) == (255, 0, 0, 255)
    palette.putpixel((0, 0), 0)
    assert decode_image(save(palette, "PNG", transparency=0), keep_alpha=True).getpixel((0, 0))[3] == 0
    assert decode_image(save(Image.new("RGB", (4, 4), RED), "PNG"), keep_alpha=True).mode == "RGB"  # nothing to keep


def test_palette_with_transparency_index():
    src = Image.new("P", (4, 4), 1)
    src.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    src.putpixel((0, 0), 2)
    src.putpixel((3, 3), 0)
    img = decode_image(save(src, "PNG", transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == RED
    assert img.getpixel((0, 0)) == BLUE
    assert img.getpixel((3, 3)) == WHITE


def test_cmyk_jpeg():
    img = decode_image(save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.mode == "RGB"
    assert close(img.getpixel((4, 4)), RED, 12)


def test_16_bit_greyscale_is_scaled_not_clipped():
    src = Image.fromarray(np.array([[0, 32896, 65535, 1000]], dtype=np.uint16))
    assert src.mode == "I;16"
    data = save(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = decode_image(data)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), WHITE, (4, 4, 4)]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 77, (77, 77, 77)), ("LA", (77, 0), WHITE), ("1", 1, WHITE), ("1", 0, (0, 0, 0))],
)
def test_greyscale_and_bilevel(mode, value, expected):
    img = decode_image(save(Image.new(mode, (3, 3), value), "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == expected


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", bytes(1000), b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0" + b"\x00" * 20],
    ids=["empty", "text", "zeros", "png-magic-only", "jpeg-magic-only"],
)
def test_garbage_is_invalid_image(data):
    with pytest.raises(InvalidImage) as exc:
        decode_image(data)
    assert exc.value.code == "INVALID_IMAGE"
    assert "\n" not in exc.value.message


def test_truncated_png_is_invalid_image():
    data = save(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(InvalidImage, match="corrupt or truncated") as exc:
        decode_image(data[: len(data) // 2])
    assert exc.value.code == "INVALID_IMAGE"


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_other_pillow_formats_are_unsupported(fmt, name):
    with pytest.raises(UnsupportedFormat) as exc:
        decode_image(save(Image.new("RGB", (16, 16), RED), fmt))
    assert exc.value.code == "UNSUPPORTED_FORMAT"
    assert name in exc.value.message and "JPEG" in exc.value.message and "AVIF" in exc.value.message


def test_heic_is_named():
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(UnsupportedFormat, match="HEIC"):
        decode_image(heic)


def test_header_claiming_huge_size_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge) as exc:
        decode_image(png_claiming(100_000, 100_000))
    assert exc.value.code == "IMAGE_TOO_LARGE"
    # Below Pillow's own bomb ceiling, our limit still applies (and names the size).
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        decode_image(png_claiming(8000, 8000))
    # Even with our limit lifted, Pillow's ceiling maps to the same error.
    with pytest.raises(ImageTooLarge):
        decode_image(png_claiming(100_000, 100_000), max_pixels=10**12)


def test_max_pixels_on_a_real_image():
    data = save(Image.new("1", (2000, 1000)), "PNG")  # cheap to build, 2M pixels
    with pytest.raises(ImageTooLarge, match="2000x1000"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=2_000_000).size == (2000, 1000)


def test_byte_limit():
    data = save(Image.effect_noise((32, 32), 50), "PNG")
    with pytest.raises(ImageTooLarge) as exc:
        decode_image(data, max_bytes=len(data) - 1)
    assert exc.value.code == "IMAGE_TOO_LARGE"
    assert decode_image(data, max_bytes=len(data)).size == (32, 32)


def test_non_bytes_and_bad_limits_are_invalid_input():
    with pytest.raises(InvalidInput):
        decode_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        decode_image(b"x", max_bytes=0)


def test_mutated_images_only_raise_our_errors():
    # Random corruption must never leak a raw Pillow/zlib exception.
    rng = random.Random(1234)
    sources = [save(two_tone(), f) for f in ("PNG", "JPEG", "GIF", "WEBP")]
    for _ in range(120):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            img = decode_image(bytes(data))
        except IncontextError as exc:
            assert "\n" not in exc.message
        else:
            assert img.mode == "RGB"


# ------------------------------------------------------------------------------ files


def test_load_image(tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(save(two_tone(), "PNG"))
    assert load_image(path).size == (40, 20)
    assert load_image(str(path)).getpixel((35, 10)) == BLUE
    with pytest.raises(ImageTooLarge):
        load_image(path, max_bytes=10)


def test_load_image_missing_or_directory(tmp_path):
    with pytest.raises(InvalidInput, match="no such image file") as exc:
        load_image(tmp_path / "missing.png")
    assert exc.value.code == "INVALID_INPUT"
    with pytest.raises(InvalidInput, match="directory"):
        load_image(tmp_path)


# ------------------------------------------------------------------------------ data URIs


def test_data_uri_and_bare_base64():
    png = save(two_tone(), "PNG")
    b64 = base64.b64encode(png).decode()
    assert decode_data_uri(f"data:image/png;base64,{b64}").getpixel((5, 5)) == RED
    assert decode_data_uri(b64).size == (40, 20)  # tolerated: bare base64
    assert decode_base64_image(b64).size == (40, 20)
    assert decode_base64_image(f"data:image/png;base64,{b64}").size == (40, 20)
    # Line-wrapped, unpadded and URL-safe variants all occur in the wild.
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert decode_data_uri(f"data:image/png;base64,{wrapped}").size == (40, 20)
    assert decode_base64_image(b64.rstrip("=")).size == (40, 20)
    assert decode_base64_image(base64.urlsafe_b64encode(png).decode()).size == (40, 20)
    # The declared type is not trusted: the bytes decide.
    assert decode_data_uri(f"data:image/jpeg;base64,{b64}").size == (40, 20)


@pytest.mark.parametrize(
    "uri",
    ["data:image/png;base64,@@@not*base64!!", "data:image/png;base64,", "data:image/png;base64", "%%%"],
)
def test_bad_base64_is_invalid_image(uri):
    with pytest.raises(InvalidImage) as exc:
        decode_data_uri(uri)
    assert exc.value.code == "INVALID_IMAGE"


def test_data_uri_errors():
    b64 = base64.b64encode(save(two_tone(), "PNG")).decode()
    with pytest.raises(UnsupportedFormat):
        decode_data_uri(f"data:text/plain;base64,{b64}")
    with pytest.raises(ImageTooLarge):
        decode_data_uri(f"data:image/png;base64,{b64}", max_bytes=len(base64.b64decode(b64)) - 1)
    with pytest.raises(InvalidInput):
        decode_data_uri(None)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedFormat):
        decode_data_uri("data:image/bmp;base64," + base64.b64encode(save(two_tone(), "BMP")).decode())


# ------------------------------------------------------------------------------ encoding


def test_png_round_trip_is_exact():
    src = Image.effect_noise((32, 24), 60).convert("RGB")
    data = encode_image(src, "png")
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(src))


def test_jpeg_round_trip_and_quality():
    src = Image.effect_noise((64, 64), 40).convert("RGB")
    high, low = encode_image(src, "jpeg", quality=95), encode_image(src, "jpg", quality=30)
    assert high.startswith(b"\xff\xd8") and low.startswith(b"\xff\xd8")
    assert len(low) < len(high)
    flat = decode_image(encode_image(two_tone(), "JPEG"))
    assert close(flat.getpixel((5, 5)), RED, 12)


def test_provenance_names_the_model_and_leaves_the_pixels_alone():
    src = Image.effect_noise((32, 24), 60).convert("RGB")
    made = imageio.Provenance("incontext/nano", composite=True)
    png = Image.open(io.BytesIO(encode_image(src, "png", provenance=made)))
    assert png.info["Source"] == "incontext/nano" and png.info["AI-Generated"] == "true"
    assert png.info["Description"] == "AI-generated: edited by the model incontext/nano" and png.info["Software"].startswith("incontext ")
    assert "digitalsourcetype/compositeWithTrainedAlgorithmicMedia" in png.info["XML:com.adobe.xmp"]
    assert np.array_equal(np.asarray(png), np.asarray(src))  # metadata only: the same pixels, bit for bit

    jpeg = encode_image(src, "jpeg", provenance=imageio.Provenance("a & <b>"))
    exif = Image.open(io.BytesIO(jpeg)).getexif()
    assert exif[0x010E] == "AI-generated by the model a & <b>" and exif[0x0131].startswith("incontext ")
    assert b"digitalsourcetype/trainedAlgorithmicMedia" in jpeg and b"a &amp; &lt;b&gt;" in jpeg  # XMP, escaped
    assert np.array_equal(np.asarray(decode_image(jpeg)), np.asarray(decode_image(encode_image(src, "jpeg"))))

    bare = Image.open(io.BytesIO(encode_image(src, "png")))
    assert "Source" not in bare.info and "exif" not in Image.open(io.BytesIO(encode_image(src, "jpeg"))).info  # none unless asked


def test_encode_rgba_to_jpeg_composites_on_white():
    img = decode_image(encode_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "jpeg"))
    assert close(img.getpixel((4, 4)), WHITE, 3)


def test_encode_errors():
    with pytest.raises(UnsupportedFormat) as exc:
        encode_image(two_tone(), "webp")
    assert exc.value.code == "UNSUPPORTED_FORMAT"
    with pytest.raises(InvalidInput):
        encode_image(two_tone(), "jpeg", quality=0)
    with pytest.raises(InvalidInput):
        encode_image(b"not an image", "png")  # type: ignore[arg-type]


def test_content_type_suffix_and_data_uri():
    assert content_type("jpeg") == content_type("JPG") == "image/jpeg"
    assert content_type("png") == "image/png"
    assert format_from_suffix("out/a.JPG") == format_from_suffix("a.jpeg") == "jpeg"
    assert format_from_suffix("a.png") == "png"
    for bad in ("a.gif", "a.webp", "noext"):
        with pytest.raises(UnsupportedFormat):
            format_from_suffix(bad)
    with pytest.raises(UnsupportedFormat):
        content_type("tiff")
    data = encode_image(two_tone(), "png")
    uri = to_data_uri(data, "png")
    assert uri.startswith("data:image/png;base64,")
    assert decode_data_uri(uri).getpixel((35, 5)) == BLUE


def test_public_names():
    for name in imageio.__all__:
        assert hasattr(imageio, name)


# A 39 KB PNG of 6300×6300 palette pixels with a transparent index, decoded in a fresh process
# so its peak RSS is its own. It used to take three RGBA copies (about 650 MB over the
# baseline); composited through its palette it takes the indices and the RGB result.
_BOMB_SCRIPT = """
import io, resource, sys
from PIL import Image
from incontext import imageio
im = Image.new("P", (6300, 6300), 0)
im.putpalette([255, 0, 0] * 256)
buf = io.BytesIO()
im.save(buf, "PNG", transparency=0, optimize=True)
del im
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rgb = imageio.decode_image(buf.getvalue(), max_bytes=1 << 20, max_pixels=40_000_000)
assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_palette_bomb_with_transparency_decodes_in_bounded_memory():
    import subprocess
    import sys

    grown_mb = int(subprocess.run([sys.executable, "-c", _BOMB_SCRIPT], capture_output=True, text=True, check=True, timeout=120).stdout)
    rgb_mb = 6300 * 6300 * 3 / 2**20  # 114 MB: the result itself
    assert grown_mb < 2.2 * rgb_mb, f"decoding grew the process by {grown_mb} MB"


def test_palette_transparency_composites_as_alpha_composite_does():
    src = Image.new("P", (40, 20))
    src.putpalette([(i * 7) % 256 for i in range(768)])
    src.putdata([i % 256 for i in range(800)])
    alpha = bytes(range(0, 256))
    out = imageio.decode_image(_save(src, transparency=alpha))
    expected = Image.alpha_composite(Image.new("RGBA", src.size, "white"), _open(_save(src, transparency=alpha)).convert("RGBA")).convert("RGB")
    assert out.tobytes() == expected.tobytes()


def _save(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
