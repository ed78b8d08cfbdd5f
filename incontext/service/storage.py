"""Run inputs and outputs on disk, and the signed, expiring URLs that serve outputs.

    <data_dir>/inputs/<run_id>                 the input image bytes as received (or the data URI)
    <data_dir>/references/<run_id>/<i>         reference image i (1…3) as received, the same way
    <data_dir>/references/<run_id>/mask        the client's mask (where change is allowed), the same way
    <data_dir>/outputs/<run_id>/<i>.<ext>      output image i
    <data_dir>/outputs/<run_id>/<i>.mask.png   its edited region, when the run asked for it

An output URL is `<base>/v1/files/<run_id>/<i>.<ext>?expires=<unix s>&sig=<HMAC>`: whoever holds
it may download the file until it expires, with no API key (as hosted output URLs work).
A run's input is signed the same way as `<run_id>/input` (the "before" of its first turn).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit, parse_qs

from incontext.service.errors import NotFound, PermissionDenied, StorageError

FILES_PREFIX = "/v1/files/"
_RELPATH = re.compile(r"^[0-9a-f-]{36}/[0-9]{1,2}\.(jpeg|png|mask\.png)$")
_INPUT_RELPATH = re.compile(r"^([0-9a-f-]{36})/input$")


def load_or_create_secret(data_dir: Path, configured: str | None) -> bytes:
    """The URL-signing key: configured, or made once and kept in the data dir so URLs
    stay valid across restarts."""
    if configured:
        return configured.encode()
    path = data_dir / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


class Storage:
    def __init__(self, data_dir: Path, *, secret: bytes, base_url: str, ttl_seconds: int):
        self.inputs = data_dir / "inputs"
        self.outputs = data_dir / "outputs"
        self.references = data_dir / "references"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.references.mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl_seconds = ttl_seconds

    # Inputs: kept as long as the run's outputs (retention.py), so a restart can run the run
    # again and a client can show what it edited.
    def save_input(self, run_id: str, data: bytes) -> None:
        # Synced: the run is acknowledged (201) once this returns, and a crash must not lose it.
        _write_atomic(self.inputs / run_id, data, sync=True)

    def read_input(self, run_id: str) -> bytes | None:
        path = self.inputs / run_id
        return path.read_bytes() if path.exists() else None

    def has_input(self, run_id: str) -> bool:
        return (self.inputs / run_id).exists()

    def delete_input(self, run_id: str) -> None:
        """The input and its references: they are kept, and go, together."""
        (self.inputs / run_id).unlink(missing_ok=True)
        shutil.rmtree(self.references / run_id, ignore_errors=True)

    # References: in a folder of the run's own, so that a listing of inputs/ stays one file
    # per run (retention.py reads run ids from it).
    def save_references(self, run_id: str, images: list[bytes]) -> None:
        if not images:
            return
        try:
            (self.references / run_id).mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not store a reference image: {exc.strerror or exc}") from None
        for i, data in enumerate(images, start=1):
            _write_atomic(self.references / run_id / str(i), data, sync=True)

    def read_references(self, run_id: str, count: int) -> list[bytes] | None:
        """The run's `count` references in order; None if any is gone."""
        paths = [self.references / run_id / str(i) for i in range(1, count + 1)]
        return [p.read_bytes() for p in paths] if all(p.exists() for p in paths) else None

    # The client's mask: beside the references, so it is kept and deleted with the input
    # (delete_input) and retention finds it under the run's folder there.
    def save_input_mask(self, run_id: str, data: bytes) -> None:
        try:
            (self.references / run_id).mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not store the mask: {exc.strerror or exc}") from None
        _write_atomic(self.references / run_id / "mask", data, sync=True)

    def read_input_mask(self, run_id: str) -> bytes | None:
        path = self.references / run_id / "mask"
        return path.read_bytes() if path.exists() else None

    def input_url(self, run_id: str) -> str | None:
        """A signed URL of the run's input while it is kept, else None."""
        return self.signed_url(f"{run_id}/input") if self.has_input(run_id) else None

    def input_at(self, relpath: str) -> bytes | None:
        """The stored input a file URL's path names (`<run_id>/input`); None for any other path.
        NotFound once it is gone."""
        if not (match := _INPUT_RELPATH.match(relpath)):
            return None
        if (data := self.read_input(match[1])) is None:
            raise NotFound("no such file")
        return data

    # Outputs.
    def save_output(self, run_id: str, index: int, data: bytes, ext: str) -> str:
        relpath = f"{run_id}/{index}.{ext}"
        try:
            (self.outputs / run_id).mkdir(exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not store the output: {exc.strerror or exc}") from None
        _write_atomic(self.outputs / relpath, data)
        return relpath

    def save_mask(self, run_id: str, index: int, png: bytes) -> str:
        # Beside its image, so it goes with the run's other outputs (delete_outputs).
        return self.save_output(run_id, index, png, "mask.png")

    def delete_outputs(self, run_id: str) -> None:
        shutil.rmtree(self.outputs / run_id, ignore_errors=True)

    def output_path(self, relpath: str) -> Path:
        if not _RELPATH.match(relpath):
            raise NotFound("no such file")
        path = self.outputs / relpath
        if not path.is_file():
            raise NotFound("no such file")
        return path

    def signed_url(self, relpath: str) -> str:
        expires = int(time.time()) + self.ttl_seconds
        query = urlencode({"expires": expires, "sig": self._sign(relpath, expires)})
        return f"{self.base_url}{FILES_PREFIX}{relpath}?{query}"

    def check_signature(self, relpath: str, expires: int, sig: str, *, now: float | None = None) -> None:
        """Raises PermissionDenied (403) for a bad signature or a past expiry."""
        if not _same(self._sign(relpath, expires), sig):
            raise PermissionDenied("bad file signature")
        if expires < (time.time() if now is None else now):
            raise PermissionDenied("file URL expired; fetch the run again for a fresh URL")

    def own_output(self, url: str) -> tuple[str, str] | None:
        """(run_id, relpath) if `url` is an output URL this server signed, else None.

        The host is not compared (the server may be reached by several names) and the expiry
        is not enforced: the signature alone proves the URL came from here.
        """
        parts = urlsplit(url)
        if not parts.path.startswith(FILES_PREFIX):
            return None
        relpath = parts.path[len(FILES_PREFIX) :]
        query = parse_qs(parts.query)
        try:
            expires, sig = int(query["expires"][0]), query["sig"][0]
        except (KeyError, ValueError):
            return None
        if not _RELPATH.match(relpath) or not _same(self._sign(relpath, expires), sig):
            return None
        return relpath.split("/", 1)[0], relpath

    def _sign(self, relpath: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{relpath}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _same(expected: str, given: str) -> bool:
    # compare_digest refuses a str with non-ASCII characters (a TypeError, once a 500);
    # as bytes any string compares, in constant time.
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


def _write_atomic(path: Path, data: bytes, *, sync: bool = False) -> None:
    # A crash mid-write must not leave a truncated image that a restart would then use.
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        # Disk full or unwritable: the request or run fails with STORAGE_ERROR, not the server.
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write a file of the run: {exc.strerror or exc}") from None
