"""An `image_url` → image bytes, checked at submit time, and back to an image at run time.

Three kinds of URL: `data:` URIs, this server's own output URLs (read from storage with no
network fetch: multi-turn editing), and http(s) URLs (downloaded with a size cap and a
timeout). What is stored for a run is what was received: the fetched bytes, or the data URI
text itself, so a restart decodes exactly what the submitter sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image
from sqlalchemy.orm import Session

from incontext import imageio
from incontext.models.registry import ModelPreset
from incontext.errors import ImageTooLarge
from incontext.service import netpolicy
from incontext.service.errors import ImageFetchFailed
from incontext.service.models import Run
from incontext.service.storage import Storage
from incontext.settings import Settings

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class RunInput:
    """A run's input as the dispatcher holds it: what the engine gets, and what an output
    keeps its untouched pixels from (preserve.py)."""

    source: Image.Image  # decoded, RGB, at its own size
    fitted: Image.Image  # fitted to the run's output size (params width × height)

    @classmethod
    def fit(cls, source: Image.Image, width: int, height: int) -> RunInput:
        return cls(source=source, fitted=imageio.fit_to_size(source, width, height))

    @property
    def pixels(self) -> int:
        return self.source.width * self.source.height + self.fitted.width * self.fitted.height


@dataclass
class SourceImage:
    data: bytes  # what is stored for the run
    image: Image.Image  # decoded, RGB
    parent_run_id: str | None  # set when the image is an earlier output of this server


def decode_stored(data: bytes, settings: Settings) -> Image.Image:
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    if data[:5].lower() == b"data:":
        return imageio.decode_data_uri(data.decode("ascii", "replace"), **limits)
    return imageio.decode_image(data, **limits)


def load_source(url: str, *, api_key_id: str, session: Session, storage: Storage, settings: Settings) -> SourceImage:
    """Resolve and decode `image_url`. Raises IncontextError subclasses (INVALID_IMAGE,
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
        data = fetch(url, settings)
    else:
        raise ImageFetchFailed("image_url must be an http(s) URL, a data: URI, or an output URL of this server")
    return SourceImage(data=data, image=decode_stored(data, settings), parent_run_id=parent)


def output_size(image: Image.Image, aspect_ratio: str | None, preset: ModelPreset) -> tuple[int, int]:
    return imageio.output_size(image.width, image.height, aspect_ratio, target_area=preset.target_area, multiple=preset.multiple)


def fetch(url: str, settings: Settings) -> bytes:
    """GET an image, following a few redirects, each hop checked against the network policy."""
    import httpx  # here: most runs send their image inline, and the server starts faster without it

    limit = settings.max_image_bytes
    with httpx.Client(timeout=settings.fetch_timeout_seconds, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_host(url, settings)
            try:
                with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageFetchFailed(f"fetching image_url returned HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise ImageTooLarge(f"image_url is {int(declared):,} bytes; the limit is {limit:,} bytes")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise ImageTooLarge(f"image_url is larger than the {limit:,}-byte limit")
                    return bytes(body)
            except httpx.TimeoutException:
                raise ImageFetchFailed(f"fetching image_url timed out after {settings.fetch_timeout_seconds:g} s") from None
            except httpx.HTTPError as exc:
                raise ImageFetchFailed(f"could not fetch image_url: {exc.__class__.__name__}: {exc}") from None
    raise ImageFetchFailed(f"image_url redirected more than {MAX_REDIRECTS} times")


def check_host(url: str, settings: Settings) -> None:
    if reason := netpolicy.refusal(url, allow_private=settings.allow_private_fetch):
        raise ImageFetchFailed(f"image_url: {reason}; the server does not fetch it")
