"""An `image_url` → image bytes, checked at submit time, and back to an image at run time.

Three kinds of URL: `data:` URIs, this server's own output URLs (read from storage with no
network fetch: multi-turn editing), and http(s) URLs (downloaded by `prefetch` on the event
loop before the route takes a thread, through outbound.py). What is stored for a run is what
was received: the fetched bytes, or the data URI text itself, so a restart decodes exactly
what the submitter sent. Reference images (`image_urls` after the first) take the same path
and are stored the same way (Storage.save_references).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image
from sqlalchemy.orm import Session

from incontext import imageio
from incontext.models.registry import ModelPreset
from incontext.errors import ImageTooLarge, IncontextError
from incontext.service.errors import ImageFetchFailed
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

    @classmethod
    def fit(cls, source: Image.Image, width: int, height: int, references: Sequence[Image.Image] = ()) -> RunInput:
        kept = source if source.width * source.height <= KEEP_SOURCE_PIXELS else None
        fitted_references = tuple(imageio.fit_to_size(r, width, height) for r in references)
        return cls(fitted=imageio.fit_to_size(source, width, height), source_size=source.size, source=kept, references=fitted_references)

    @property
    def pixels(self) -> int:
        kept = self.source.width * self.source.height if self.source is not None else 0
        return kept + sum(im.width * im.height for im in (self.fitted, *self.references))

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


def decode_stored(data: bytes, settings: Settings) -> Image.Image:
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
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
    return SourceImage(data=data, image=decode_stored(data, settings), parent_run_id=parent)


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
