import io
import tarfile

import pytest

from fer_dist.data.shards import tars


def ustar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


MEMBERS = {"v/00001.cls": b"3", "v/00001.jpg": b"\xff\xd8" * 300, "v/00002.cls": b"4", "v/00002.jpg": b"x" * 513}


def test_reads_what_tarfile_writes_and_what_it_writes_tarfile_reads():
    got = list(tars.samples(io.BytesIO(ustar(MEMBERS)), "u"))
    assert got == [
        {"__key__": "v/00001", "__url__": "u", "cls": b"3", "jpg": b"\xff\xd8" * 300},
        {"__key__": "v/00002", "__url__": "u", "cls": b"4", "jpg": b"x" * 513},
    ]
    ours = tars.tar_record("v/00001", {"cls": b"3", "jpg": b"y" * 700}) + tars.TAR_END
    with tarfile.open(fileobj=io.BytesIO(ours)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == {"v/00001.cls": b"3", "v/00001.jpg": b"y" * 700}


def test_damage_raises():
    good = ustar(MEMBERS)
    with pytest.raises(EOFError, match="truncated"):
        list(tars.samples(io.BytesIO(good[:1500]), "u"))
    with pytest.raises(EOFError, match="end marker"):
        whole = sum(512 + -len(d) % 512 + len(d) for d in MEMBERS.values())
        list(tars.samples(io.BytesIO(good[:whole]), "u"))  # every member whole, the end marker missing
    garbled = bytearray(good)
    garbled[125] ^= 0x01  # a size digit of the first header
    with pytest.raises(ValueError, match="checksum"):
        list(tars.samples(io.BytesIO(bytes(garbled)), "u"))
