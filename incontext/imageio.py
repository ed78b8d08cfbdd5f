"""Image decoding/encoding and output sizing: the one place that turns bytes into RGB images.

Every failure is an `incontext.errors` class with a one-line message; no raw Pillow,
base64 or OS exception leaves this module.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps

from incontext.errors import (
    ImageTooLarge,
    IncontextError,
    InvalidImage,
    InvalidInput,
    UnsupportedFormat,
)
from incontext.provenance import Provenance, jpeg_metadata, png_metadata

__all__ = [
    "ACCEPTED_FORMATS",
    "ASPECT_RATIOS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "OUTPUT_FORMATS",
    "Provenance",
    "content_type",
    "decode_base64_image",
    "data_uri_bytes",
    "decode_data_uri",
    "decode_image",
    "encode_image",
    "crop_box",
    "fit_to_size",
    "keeps_framing",
    "format_from_suffix",
    "load_image",
    "output_size",
    "sniff_content_type",
    "to_data_uri",
]

DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow format id -> name shown to users. MPO is what Pillow calls JPEGs that carry extra
# pictures (many phone cameras write them); it is a JPEG to the user.
_DECODERS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "AVIF": "AVIF"}
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WebP", "GIF", "AVIF")
_ACCEPTED_TEXT = ", ".join(ACCEPTED_FORMATS)
# MPO is produced by the JPEG plugin's factory, so restricting Image.open to these ids still yields it.
_OPEN_IDS = ["JPEG", "PNG", "WEBP", "GIF", "AVIF"]
_CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "AVIF": "image/avif"}

# Canonical output format -> (Pillow id, content type).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}
_FORMAT_ALIASES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}

# Aspect ratio name -> (w, h); None means "the input's".
ASPECT_RATIOS: dict[str, tuple[int, int] | None] = {
    "21:9": (21, 9),
    "16:9": (16, 9),
    "4:3": (4, 3),
    "3:2": (3, 2),
    "1:1": (1, 1),
    "2:3": (2, 3),
    "3:4": (3, 4),
    "9:16": (9, 16),
    "9:21": (9, 21),
    "square_hd": (1, 1),
    "square": (1, 1),
    "portrait_4_3": (3, 4),
    "portrait_16_9": (9, 16),
    "landscape_4_3": (4, 3),
    "landscape_16_9": (16, 9),
    "match_input_image": None,
}
_MAX_RATIO = 21 / 9  # the widest ratio the contract offers; inputs beyond it are clamped

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


# ---------------------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, keep_alpha: bool = False
) -> Image.Image:
    """Decode JPEG/PNG/WebP/GIF/AVIF bytes to an upright 8-bit RGB image (metadata dropped);
    `keep_alpha`: RGBA instead where the image has transparency (a logo to lay over another)."""
    _check_limits(max_bytes, max_pixels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"image data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    try:
        return _decode(data, max_pixels, keep_alpha)
    except IncontextError:
        raise
    except MemoryError as exc:
        raise ImageTooLarge("the image is too large to decode in the available memory") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own global ceiling; DecompressionBombWarning only arrives here when
        # warnings are configured as errors.
        raise ImageTooLarge("the image has too many pixels to decode safely") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data; map them all
        raise InvalidImage("the image data is corrupt or truncated") from exc


def load_image(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, keep_alpha: bool = False
) -> Image.Image:
    """`decode_image` on a file's contents."""
    _check_limits(max_bytes, max_pixels)
    try:
        path = os.fspath(path)
    except TypeError as exc:
        raise InvalidInput(f"image path must be a string or path, not {type(path).__name__}") from exc
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{path} is a directory, not an image file")
        # Refuse FIFOs/devices: reading them could block forever or never end.
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ImageTooLarge(f"{path} is {st.st_size:,} bytes; the limit is {max_bytes:,} bytes")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # +1: notice a file that grew after stat
    except IncontextError:
        raise
    except FileNotFoundError as exc:
        raise InvalidInput(f"no such image file: {path}") from exc
    except PermissionError as exc:
        raise InvalidInput(f"permission denied reading {path}") from exc
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in the path
        raise InvalidInput(f"cannot read image file {path!r}") from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, keep_alpha=keep_alpha)


def decode_data_uri(
    uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, keep_alpha: bool = False
) -> Image.Image:
    """Decode `data:image/...;base64,...` (or a bare base64 string) as decode_image does."""
    # The declared media type is not trusted: decode_image sniffs the real format.
    return decode_image(data_uri_bytes(uri, max_bytes=max_bytes), max_bytes=max_bytes, max_pixels=max_pixels, keep_alpha=keep_alpha)


def data_uri_bytes(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The encoded image inside `data:image/...;base64,...` (or a bare base64 string), undecoded."""
    text = _as_text(uri)
    if text.lstrip()[:5].lower() != "data:":
        return _b64decode(text, max_bytes)
    header, sep, payload = text.strip()[5:].partition(",")
    if not sep:
        raise InvalidImage("malformed data URI: no ',' separating the header from the data")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise UnsupportedFormat(f"data URI has media type {media_type!r}; expected an image ({_ACCEPTED_TEXT})")
    if "base64" in params[1:]:
        return _b64decode(payload, max_bytes)
    # RFC 2397 also allows percent-encoded data; rare for images but cheap to honour.
    if len(payload) > 3 * max_bytes:
        raise ImageTooLarge(f"the data URI is larger than the {max_bytes:,}-byte image limit")
    return unquote_to_bytes(payload)


def sniff_content_type(data: bytes) -> str | None:
    """The content type of encoded image bytes in an accepted format, read from the header alone
    (nothing is decoded); None for anything else."""
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_IDS) as im:
            return _CONTENT_TYPES.get(im.format or "")
    except Exception:  # noqa: BLE001 - not an image we accept, whatever Pillow says why
        return None


def decode_base64_image(
    b64: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a bare base64 string (standard or URL-safe alphabet; a data URI also works) to RGB."""
    text = _as_text(b64)
    if text.lstrip()[:5].lower() == "data:":
        return decode_data_uri(text, max_bytes=max_bytes, max_pixels=max_pixels)
    return decode_image(_b64decode(text, max_bytes), max_bytes=max_bytes, max_pixels=max_pixels)


def _decode(data: bytes, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_IDS)
    except Image.UnidentifiedImageError:
        raise _unrecognised(data) from None
    with im:
        fmt = _DECODERS.get(im.format or "", im.format or "image")
        w, h = im.size
        # Header size only: nothing has been decoded yet, so a bomb costs nothing here.
        if w * h > max_pixels:
            raise ImageTooLarge(f"the image is {w}x{h} ({w * h:,} pixels); the limit is {max_pixels:,} pixels")
        if w < 1 or h < 1:
            raise InvalidImage(f"the {fmt} image has no pixels ({w}x{h})")
        try:
            im.seek(0)  # animated GIF/WebP/AVIF/PNG/MPO: the first frame
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise InvalidImage(f"the {fmt} image is corrupt or truncated") from exc
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not reject good pixels
            upright = im.copy()
        wide = upright.mode.startswith("I;16") or upright.mode in ("I", "F")  # 16-bit grey: _to_rgb scales it
        transparent = keep_alpha and not wide and (upright.has_transparency_data or upright.mode in ("RGBA", "RGBa", "LA", "La", "PA"))
        rgb = upright.convert("RGBA") if transparent else _to_rgb(upright)
    if rgb is im:  # never hand out an image still tied to the (closed) file
        rgb = rgb.copy()
    rgb.info = {}  # drop EXIF/ICC/comments: stale orientation, privacy (GPS) and no colour management
    return rgb


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert() clips 16-bit values at 255 instead of scaling; 16-bit PNGs
        # (the only source of these modes among accepted formats) span 0..65535.
        import numpy as np  # here: the server's process has no other use for it, and it is slow to import

        arr = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        trns = im.info.get("transparency")
        if isinstance(trns, int):  # a PNG tRNS grey value: those pixels are transparent -> white
            grey[arr == trns] = 255
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "RGB" and not im.has_transparency_data:
        return im
    if mode == "P" and "transparency" in im.info:
        # Composite the palette, not the pixels: 256 entries instead of an RGBA copy of the
        # whole image (a 39 KB 6300×6300 PNG once took 600 MB here).
        return _palette_on_white(im)
    if im.has_transparency_data or mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_white(im)
    # P, L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions are exact enough.
    return im.convert("RGB")


def _over_white(value: int, alpha: int) -> int:
    """One channel composited on white, rounded as Image.alpha_composite rounds it (7-bit
    fixed point, division by 255 by shifts), so both paths give the same bytes."""
    tmp = value * alpha * 128 + 255 * (255 - alpha) * 128 + (0x80 << 7)
    return (((tmp >> 8) + tmp) >> 8) >> 7


def _palette_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA") if im.size[0] * im.size[1] <= 256 else None  # tiny: no saving to be had
    if rgba is not None:
        return _composite_on_white(rgba)
    entries = Image.frombytes("P", (256, 1), bytes(range(256)))
    entries.putpalette(im.getpalette("RGB") or [])
    entries.info["transparency"] = im.info["transparency"]
    rgba = entries.convert("RGBA").tobytes()  # what each index means, with its alpha
    flat = im.copy()  # the same indices, with the composited colours and no transparency
    flat.info.pop("transparency", None)
    flat.putpalette([_over_white(rgba[i + c], rgba[i + 3]) for i in range(0, 1024, 4) for c in range(3)])
    return flat.convert("RGB")


def _composite_on_white(im: Image.Image, band_rows: int = 256) -> Image.Image:
    """Composite on white a band of rows at a time: the peak is the image, the RGB result
    and one band, not three full RGBA copies."""
    out = Image.new("RGB", im.size)
    w, h = im.size
    for top in range(0, h, band_rows):
        band = im.crop((0, top, w, min(h, top + band_rows))).convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
    return out


def _unrecognised(data: bytes) -> IncontextError:
    """Name the format of data none of the accepted decoders recognised, if we can."""
    head = data[:64]
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return UnsupportedFormat(f"HEIC/HEIF images are not supported; accepted formats: {_ACCEPTED_TEXT}")
    lowered = head.lstrip().lower()
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return UnsupportedFormat(f"SVG images are not supported; accepted formats: {_ACCEPTED_TEXT}")
    # Only identify (read the header) with the other plugins, never decode their pixels.
    try:
        with Image.open(io.BytesIO(data)) as other:
            name = other.format
    except Exception:  # noqa: BLE001
        name = None
    if name:
        return UnsupportedFormat(f"{name} images are not supported; accepted formats: {_ACCEPTED_TEXT}")
    return InvalidImage(f"the data is not a recognisable image (accepted formats: {_ACCEPTED_TEXT})")


def _b64decode(text: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())  # line-wrapped base64 (MIME, PEM style) is common
    if not compact:
        raise InvalidImage("the base64 image data is empty")
    # Check before decoding so a huge string costs no second copy.
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageTooLarge(f"the image is larger than the {max_bytes:,}-byte limit")
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("the image is not valid base64") from exc


def _as_text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError as exc:
            raise InvalidImage("base64 image data must be ASCII text") from exc
    if not isinstance(value, str):
        raise InvalidInput(f"expected a base64 string or data URI, not {type(value).__name__}")
    return value


def _check_limits(max_bytes: object, max_pixels: object) -> None:
    for name, value in (("max_bytes", max_bytes), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------- encoding


def _output_format(fmt: object) -> str:
    key = fmt.strip().lstrip(".").lower() if isinstance(fmt, str) else None
    canonical = _FORMAT_ALIASES.get(key or "")
    if canonical is None:
        raise UnsupportedFormat(f"output format {fmt!r} is not supported; use jpeg or png")
    return canonical


def encode_image(img: Image.Image, fmt: str, *, quality: int = 95, provenance: Provenance | None = None) -> bytes:
    """Encode to "jpeg"/"jpg" or "png" bytes; `quality` (1-100) is for JPEG. The only metadata
    is `provenance`'s, when given (an edit's output); none otherwise (masks)."""
    pil_id = OUTPUT_FORMATS[_output_format(fmt)][0]
    if not isinstance(img, Image.Image):
        raise InvalidInput(f"expected a PIL image, not {type(img).__name__}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidInput(f"quality must be an integer from 1 to 100, got {quality!r}")
    buf = io.BytesIO()
    try:
        if pil_id == "JPEG":
            # 4:4:4 chroma at high quality: edits often contain text and thin coloured lines,
            # which 4:2:0 subsampling visibly smears.
            subsampling = 0 if quality >= 90 else 2
            _to_rgb(img).save(buf, "JPEG", quality=quality, subsampling=subsampling, optimize=True, **jpeg_metadata(provenance))
        else:
            out = img if img.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16") else _to_rgb(img)
            # zlib level 1: a 128² model-like output (slightly noisy) encodes in 1.7 ms instead
            # of 3.3 ms at Pillow's default 6, for 15 % more bytes; it is on every run's path.
            out.save(buf, "PNG", compress_level=1, **png_metadata(provenance))
    except Exception as exc:  # noqa: BLE001
        raise InvalidImage(f"could not encode the image as {pil_id}") from exc
    return buf.getvalue()


def content_type(fmt: str) -> str:
    """MIME type of an output format ("jpeg"/"jpg" -> image/jpeg, "png" -> image/png)."""
    return OUTPUT_FORMATS[_output_format(fmt)][1]


def format_from_suffix(path: str | os.PathLike[str]) -> str:
    """Output format ("jpeg" or "png") for a file name's suffix."""
    suffix = os.path.splitext(os.fspath(path))[1]
    if not suffix:
        raise UnsupportedFormat(f"{os.fspath(path)!r} has no suffix; use .jpg, .jpeg or .png")
    try:
        return _output_format(suffix)
    except UnsupportedFormat:
        raise UnsupportedFormat(f"cannot write {suffix!r} files; use .jpg, .jpeg or .png") from None


def to_data_uri(data: bytes, fmt: str) -> str:
    """`data:<content type>;base64,...` for encoded image bytes."""
    return f"data:{content_type(fmt)};base64,{base64.b64encode(bytes(data)).decode('ascii')}"


# ---------------------------------------------------------------------------------------- sizing


def _requested_ratio(aspect_ratio: str | None, input_w: int, input_h: int) -> float:
    if aspect_ratio is not None and not isinstance(aspect_ratio, str):
        raise InvalidInput(f"aspect_ratio must be a string, not {type(aspect_ratio).__name__}")
    key = aspect_ratio.strip().lower() if aspect_ratio is not None else None
    if key is not None and key not in ASPECT_RATIOS:
        accepted = ", ".join(ASPECT_RATIOS)
        raise InvalidInput(f"unknown aspect_ratio {aspect_ratio!r}; accepted values: {accepted}")
    pair = ASPECT_RATIOS[key] if key is not None else None
    ratio = pair[0] / pair[1] if pair else input_w / input_h
    return min(max(ratio, 1 / _MAX_RATIO), _MAX_RATIO)


def output_size(
    input_w: int,
    input_h: int,
    aspect_ratio: str | None = None,
    *,
    target_area: int = 128 * 128,
    multiple: int = 16,
) -> tuple[int, int]:
    """(w, h) with sides multiples of `multiple`, area near `target_area`, ratio near the requested one."""
    for name, value in (("input_w", input_w), ("input_h", input_h), ("target_area", target_area), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    ratio = _requested_ratio(aspect_ratio, input_w, input_h)
    ideal_w, ideal_h = math.sqrt(target_area * ratio), math.sqrt(target_area / ratio)

    def near(ideal: float) -> range:
        k = ideal / multiple
        return range(max(1, math.floor(k) - 2), math.ceil(k) + 3)

    best: tuple[tuple[float, float, int], tuple[int, int]] | None = None
    for kw in near(ideal_w):
        for kh in near(ideal_h):
            w, h = kw * multiple, kh * multiple
            # Never flip orientation: a landscape request may round to square, not to portrait.
            if (ratio > 1 and w < h) or (ratio < 1 and w > h):
                continue
            # Equal weight on relative ratio and area error (log scale keeps it symmetric under
            # swapping w and h, so portrait results are the transposes of landscape ones).
            cost = abs(math.log((w / h) / ratio)) + abs(math.log(w * h / target_area))
            key = (round(cost, 9), abs(w * h - target_area), w)
            if best is None or key < best[0]:
                best = (key, (w, h))
    assert best is not None  # the grid always holds a square candidate
    return best[1]


def crop_box(src_w: int, src_h: int, w: int, h: int) -> tuple[float, float, float, float]:
    """The centred box of a src_w × src_h image that `fit_to_size` scales to w × h, in source
    coordinates (floats: resize() samples sub-pixel boxes exactly, so there is no double
    rounding from a separate resize-then-crop)."""
    if src_w * h > src_h * w:  # source is wider than the target: trim the sides
        crop_w = src_h * w / h
        return ((src_w - crop_w) / 2, 0.0, (src_w + crop_w) / 2, float(src_h))
    crop_h = src_w * h / w
    return (0.0, (src_h - crop_h) / 2, float(src_w), (src_h + crop_h) / 2)


def keeps_framing(aspect_ratio: str | None, input_w: int, input_h: int) -> bool:
    """Whether an output asked with `aspect_ratio` shows the input's framing, so an edit can
    be returned at the input's own size (preserve.py). A ratio within 2 % of the input's does."""
    if aspect_ratio is None:
        return True
    return abs(math.log(_requested_ratio(aspect_ratio, input_w, input_h) / (input_w / input_h))) < 0.02


def fit_to_size(img: Image.Image, w: int, h: int) -> Image.Image:
    """Resize (LANCZOS) to cover (w, h) and centre-crop to exactly that size."""
    if not isinstance(img, Image.Image):
        raise InvalidInput(f"expected a PIL image, not {type(img).__name__}")
    for name, value in (("w", w), ("h", h)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    if img.mode in ("P", "1", "PA") or img.mode.startswith("I;16"):
        img = _to_rgb(img)  # Pillow would silently use NEAREST (or refuse) for these modes
    src_w, src_h = img.size
    if (src_w, src_h) == (w, h):
        return img.copy()
    box = crop_box(src_w, src_h, w, h)
    try:
        # reducing_gap: a cheap integer pre-reduction for big downscales, visually identical.
        return img.resize((w, h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    except Exception as exc:  # noqa: BLE001
        raise InvalidImage(f"could not resize the image to {w}x{h}") from exc
