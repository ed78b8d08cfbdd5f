"""Run files behind signed, expiring URLs: outputs, masks and the input a run edited. No API
key: the signature is the permission."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from incontext import imageio
from incontext.service.deps import ReadSessionDep, SettingsDep, StorageDep
from incontext.service.errors import PermissionDenied
from incontext.service.inputs import stored_file
from incontext.service.keys import run_key_revoked

router = APIRouter(prefix="/v1", tags=["files"])


@router.get("/files/{relpath:path}", response_class=FileResponse)
def get_file(
    relpath: str, storage: StorageDep, settings: SettingsDep, session: ReadSessionDep, expires: int | None = None, sig: str | None = None
):
    """403 for a missing or bad signature, a past expiry (fetch the run again for fresh URLs)
    or a run whose key was revoked."""
    if expires is None or sig is None:
        raise PermissionDenied("file URLs must carry expires and sig; take them from the run's output")
    storage.check_signature(relpath, expires, sig)  # first: a forged URL costs no query
    if run_key_revoked(session, relpath.split("/", 1)[0]):
        raise PermissionDenied("the API key that made this run was revoked")
    cache = {"Cache-Control": "private, max-age=300"}
    if (data := storage.input_at(relpath)) is not None:  # a run's input: the lineage's source_url
        content, media_type = stored_file(data, settings)
        return Response(content, media_type=media_type, headers=cache)
    path = storage.output_path(relpath)
    return FileResponse(path, media_type=imageio.content_type(path.suffix), headers=cache)
