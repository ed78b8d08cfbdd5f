import pytest

from incontext.service.errors import NotFound, PermissionDenied
from incontext.service.storage import Storage

RUN = "01a20ae6-9d8b-772c-acf2-5cbc80614e72"


def test_signed_urls_expire_and_are_recognised(tmp_path):
    storage = Storage(tmp_path, secret=b"s", base_url="http://h:1", ttl_seconds=10)
    relpath = storage.save_output(RUN, 0, b"img", "png")
    url = storage.signed_url(relpath)
    query = dict(p.split("=", 1) for p in url.split("?")[1].split("&"))
    expires, sig = int(query["expires"]), query["sig"]
    storage.check_signature(relpath, expires, sig)
    with pytest.raises(PermissionDenied, match="expired"):
        storage.check_signature(relpath, expires, sig, now=expires + 1)
    with pytest.raises(PermissionDenied):
        storage.check_signature(f"{RUN}/1.png", expires, sig)
    # Own URLs are recognised on any host, expired or not; another key's signature is not ours.
    assert storage.own_output(url.replace("http://h:1", "https://elsewhere")) == (RUN, relpath)
    other = Storage(tmp_path, secret=b"t", base_url="http://h:1", ttl_seconds=10)
    assert other.own_output(url) is None
    assert storage.own_output("http://h:1/v1/files/../../etc/passwd?expires=1&sig=x") is None


def test_masks_are_served_beside_their_image_and_deleted_with_it(tmp_path):
    storage = Storage(tmp_path, secret=b"s", base_url="http://h:1", ttl_seconds=10)
    image, mask = storage.save_output(RUN, 0, b"img", "png"), storage.save_mask(RUN, 0, b"mask")
    assert mask == f"{RUN}/0.mask.png" and storage.output_path(mask).read_bytes() == b"mask"
    assert storage.own_output(storage.signed_url(mask)) == (RUN, mask)
    storage.delete_outputs(RUN)
    for relpath in (image, mask):
        with pytest.raises(NotFound):
            storage.output_path(relpath)


def test_an_output_that_cannot_be_written_is_a_storage_error(tmp_path):
    from incontext.service.errors import StorageError

    storage = Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    (storage.outputs / "run").write_text("a file where the run's directory should be")
    with pytest.raises(StorageError):
        storage.save_output("run", 0, b"png", "png")
