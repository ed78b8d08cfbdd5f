"""An `image_url` → image bytes, checked at submit time, and back to an image at run time.

Three kinds of URL: `data:` URIs, this server's own output URLs (read from storage with no
network fetch: multi-turn editing), and http(s) URLs (downloaded by `prefetch` on the event
loop before the route takes a thread, through outbound.py). What is stored for a run is what
was received: the fetched bytes, or the data URI text itself, so a restart decodes exactly
what the submitter sent. Reference images (`image_urls` after the first) take the same path
and are stored the same way (Storage.save_references), and so is a client's mask
(`mask_image_url`, Storage.save_input_mask): white where the output may change, black where
it must keep the input's pixels (`load_mask`; OpenAI's transparent-means-edit masks are
turned into one first, `mask_from_alpha`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image, ImageOps
from sqlalchemy.orm import Session

from incontext import imageio, preserve
from incontext.models.registry import ModelPreset
from incontext.errors import ImageTooLarge, IncontextError, InvalidImage, UnsupportedFormat
from incontext.service.errors import ImageFetchFailed, ServiceError
from incontext.service.models import Run
from incontext.service.outbound import Outbound, OutboundFailed, TooLarge
from incontext.service.storage import Storage
from incontext.settings import Settings

log = logging.getLogger(__name__)


# A source up to this size stays in memory with its run (3 MB of RGB: a 1024² upload is
# composed with no second decode); a larger one is decoded again from the stored input when
# the output is composed. Kept, a 40 MP source would hold 120 MB for as long as its run waits
# in the queue, and a handful of accepted palette bombs would hold a gigabyte (bench load).
KEEP_SOURCE_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class RunInput:
    """A run's input as the dispatcher holds it while the run waits: what the engine gets
    (`fitted`), and what an output keeps its untouched pixels from (preserve.py): the
    source at its own size when it is small, else nothing (`source_image` reads it back)."""

    fitted: Image.Image  # fitted to the run's output size (params width × height)
    source_size: tuple[int, int]  # (width, height) of the input as decoded
    source: Image.Image | None = None  # decoded, RGB, at its own size; None above KEEP_SOURCE_PIXELS
    # Further images the prompt draws on, each fitted to the output size as `fitted` is; only
    # the engine sees them (an output keeps no pixel of a reference).
    references: tuple[Image.Image, ...] = ()
    # The client's mask ("L", at the source's size), kept as the source is: None when there is
    # none, or when it was not kept (a large source, or a run read back after a restart):
    # `client_mask` reads it back then.
    mask: Image.Image | None = None

    @classmethod
    def fit(cls, source: Image.Image, width: int, height: int, references: Sequence[Image.Image] = (), mask: Image.Image | None = None) -> RunInput:
        small = source.width * source.height <= KEEP_SOURCE_PIXELS
        fitted_references = tuple(imageio.fit_to_size(r, width, height) for r in references)
        return cls(fitted=imageio.fit_to_size(source, width, height), source_size=source.size, source=source if small else None,
                   references=fitted_references, mask=mask if small else None)

    @property
    def pixels(self) -> int:
        kept = sum(im.width * im.height for im in (self.source, self.mask) if im is not None)
        return kept + sum(im.width * im.height for im in (self.fitted, *self.references))

    def client_mask(self, run_id: str, storage: Storage, settings: Settings) -> Image.Image | None:
        """The run's mask at the source's size: the one kept, or the stored one decoded again;
        None if that file is gone. Only for a run whose params say it has one."""
        if self.mask is not None:
            return self.mask
        data = storage.read_input_mask(run_id)
        return None if data is None else decode_mask(data, self.source_size, settings)

    def source_image(self, run_id: str, storage: Storage, settings: Settings) -> Image.Image | None:
        """The input at its own size: the one kept, or the run's stored input decoded again
        (under the decode slots, as at submission); None if that file is gone."""
        if self.source is not None:
            return self.source
        data = storage.read_input(run_id)
        return None if data is None else decode_stored(data, settings)


@dataclass
class SourceImage:
    data: bytes  # what is stored for the run
    image: Image.Image  # decoded, RGB
    parent_run_id: str | None  # set when the image is an earlier output of this server


class _DecodeSlots:
    """Decodes in progress at once, server-wide: a decode may briefly take several times
    the image's RGB size, so what bounds the server's memory is how many run together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: tuple[int, threading.BoundedSemaphore] | None = None

    def __call__(self, size: int) -> threading.BoundedSemaphore:
        with self._lock:
            if self._slots is None or self._slots[0] != size:
                self._slots = (size, threading.BoundedSemaphore(size))
            return self._slots[1]


_decode_slots = _DecodeSlots()


def decode_stored(data: bytes, settings: Settings, keep_alpha: bool = False) -> Image.Image:
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels, "keep_alpha": keep_alpha}
    with _decode_slots(settings.max_concurrent_decodes):
        if data[:5].lower() == b"data:":
            return imageio.decode_data_uri(data.decode("ascii", "replace"), **limits)
        return imageio.decode_image(data, **limits)


def stored_file(data: bytes, settings: Settings) -> tuple[bytes, str]:
    """A stored input as the image file it holds (a data URI unwrapped) and that file's
    content type, for the input's signed URL. No pixel is decoded."""
    if data[:5].lower() == b"data:":
        data = imageio.data_uri_bytes(data.decode("ascii", "replace"), max_bytes=settings.max_image_bytes)
    return data, imageio.sniff_content_type(data) or "application/octet-stream"


def load_source(
    url: str, *, api_key_id: str, session: Session, storage: Storage, settings: Settings, remote: Mapping[str, bytes | IncontextError] | None = None
) -> SourceImage:
    """Resolve and decode `image_url`; an http(s) URL must have been fetched already
    (`remote`, from prefetch). Raises IncontextError subclasses (INVALID_IMAGE,
    IMAGE_TOO_LARGE, UNSUPPORTED_FORMAT, IMAGE_FETCH_FAILED)."""
    data, parent = _resolve(url, api_key_id=api_key_id, session=session, storage=storage, remote=remote)
    return SourceImage(data=data, image=decode_stored(data, settings), parent_run_id=parent)


class InvalidMask(ServiceError):
    """A mask that is not an image, or that allows no change at all."""

    code = "INVALID_MASK"
    http_status = 422


@dataclass
class MaskImage:
    data: bytes  # what is stored for the run, as received
    image: Image.Image  # "L" at the edited image's own size: 255 may change, 0 must not


def load_mask(
    url: str, size: tuple[int, int], *, api_key_id: str, session: Session, storage: Storage, settings: Settings,
    remote: Mapping[str, bytes | IncontextError] | None = None,
) -> MaskImage:
    """Resolve and decode `mask_image_url` as `image_url` is (the same sources, fetch and size
    checks), as a mask of `size`. Raises INVALID_MASK for bytes that are no image and for a
    mask that is black everywhere (nothing may change: the run could only return its input);
    IMAGE_TOO_LARGE and IMAGE_FETCH_FAILED as for an image."""
    data, _ = _resolve(url, api_key_id=api_key_id, session=session, storage=storage, remote=remote)
    return MaskImage(data=data, image=decode_mask(data, size, settings))


def decode_mask(data: bytes, size: tuple[int, int], settings: Settings) -> Image.Image:
    """A stored mask as "L" of `size` (the edited image's width, height): preserve.as_mask of
    its grey levels (transparent pixels count as white, as decoding composites them on white)."""
    try:
        return preserve.as_mask(decode_stored(data, settings), size)
    except (InvalidImage, UnsupportedFormat) as exc:
        raise InvalidMask(f"the mask is not an image: {exc.message}") from None
    except ValueError as exc:
        raise InvalidMask(str(exc)) from None


def mask_from_alpha(data: bytes, settings: Settings) -> bytes:
    """An OpenAI-style mask (fully transparent where the image may be edited, as OpenAI's
    `mask` field means) as this server's: a greyscale PNG, white where it was transparent.
    Refuses (INVALID_MASK) bytes that are no image and a mask with no transparent pixel."""
    with _decode_slots(settings.max_concurrent_decodes):
        try:
            im = Image.open(io.BytesIO(data), formats=["PNG", "WEBP", "GIF"])
            if im.width * im.height > settings.max_image_pixels:  # the header's size: nothing decoded yet
                raise ImageTooLarge(f"the mask is {im.width}x{im.height}; the limit is {settings.max_image_pixels:,} pixels")
            im.load()
        except IncontextError:
            raise
        except Exception:  # noqa: BLE001 - Pillow raises many types for bad data
            raise InvalidMask("the mask is not a PNG, WebP or GIF image") from None
        alpha = im.convert("RGBA").getchannel("A") if im.has_transparency_data else None
    if alpha is None or alpha.getextrema()[0] == 255:
        raise InvalidMask("the mask has no transparent pixels, so nothing may change: transparent marks where the edit may happen")
    out = io.BytesIO()
    ImageOps.invert(alpha).save(out, "PNG")
    return out.getvalue()


def _resolve(
    url: str, *, api_key_id: str, session: Session, storage: Storage, remote: Mapping[str, bytes | IncontextError] | None
) -> tuple[bytes, str | None]:
    """(the bytes `url` names, the run whose output it is or None)."""
    url = url.strip()
    parent = None
    if url[:5].lower() == "data:":
        data = url.encode("ascii", "replace")
    elif (own := storage.own_output(url)) is not None:
        run_id, relpath = own
        parent_run = session.get(Run, run_id)
        # Another key's output is treated as if it did not exist.
        if parent_run is None or parent_run.api_key_id != api_key_id:
            raise ImageFetchFailed("image_url names an output of this server that does not exist")
        data = storage.output_path(relpath).read_bytes()
        parent = run_id
    elif urlsplit(url).scheme in ("http", "https"):
        fetched = (remote or {}).get(url) or ImageFetchFailed(FETCH_FAILED)
        if isinstance(fetched, IncontextError):
            raise fetched
        data = fetched
    else:
        raise ImageFetchFailed("image_url must be an http(s) URL, a data: URI, or an output URL of this server")
    return data, parent


def output_size(image: Image.Image, aspect_ratio: str | None, preset: ModelPreset) -> tuple[int, int]:
    return imageio.output_size(image.width, image.height, aspect_ratio, target_area=preset.target_area, multiple=preset.multiple)


FETCH_FAILED = "image_url could not be fetched"  # the same words for every refusal and failure


async def prefetch(urls: list[str], *, outbound: Outbound, storage: Storage, settings: Settings) -> dict[str, bytes | IncontextError]:
    """Download the http(s) `urls` that are not this server's own outputs, at once, on the
    event loop (outbound.py): url → its bytes, or the error to report for it. Never raises:
    the caller pins each error to the field that named the URL (load_source)."""
    remote = {u.strip() for u in urls if _is_remote(u.strip(), storage)}
    results = await asyncio.gather(*(_fetch(u, outbound, settings) for u in remote))
    return dict(zip(remote, results))


def _is_remote(url: str, storage: Storage) -> bool:
    return url[:5].lower() != "data:" and urlsplit(url).scheme in ("http", "https") and storage.own_output(url) is None


async def _fetch(url: str, outbound: Outbound, settings: Settings) -> bytes | IncontextError:
    try:
        return await outbound.get(url, deadline_s=settings.fetch_timeout_seconds, max_bytes=settings.max_image_bytes, headers={"Accept": "image/*"})
    except TooLarge as exc:
        return ImageTooLarge(f"image_url is larger than the {exc.limit:,}-byte limit")
    except OutboundFailed as exc:
        # Which of refused, unreachable, 404 or slow stays in the log: told to the client, it
        # would map the network the server sits in.
        log.info("image_url refused or failed: %s", exc)
        return ImageFetchFailed(FETCH_FAILED)
