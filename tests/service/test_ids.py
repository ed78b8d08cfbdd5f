import uuid

from incontext.service.ids import uuid7


def test_uuid7_version_variant_and_order():
    ids = [uuid7() for _ in range(5000)]  # many share a millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122
