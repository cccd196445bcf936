"""claim_volume's bookkeeping, with stand-in volumes (the real-daemon tests are in
test_claims.py)."""

from __future__ import annotations

from typing import cast

import libvirt
import pytest

import aiovirtstream._volume._claims as volumeuse
from aiovirtstream import VolumeBusyError


class FakeConnection:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def getURI(self) -> str:  # noqa: N802 (libvirt's name)
        return self.uri


class FakeVolume:
    def __init__(self, uri: str, key: str) -> None:
        self.conn, self.path = FakeConnection(uri), key

    def connect(self) -> FakeConnection:
        return self.conn

    def key(self) -> str:
        return self.path

    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def volume(uri: str = "test:///a", key: str = "/pool/v.img") -> libvirt.virStorageVol:
    return cast(libvirt.virStorageVol, FakeVolume(uri, key))


def test_claims_are_forgotten_when_they_end_and_when_they_are_refused() -> None:
    with volumeuse.claim_volume(volume(), upload=False):
        with volumeuse.claim_volume(volume(), upload=False):
            assert volumeuse._uses[("test:///a", "/pool/v.img")].downloads == 2
        with pytest.raises(VolumeBusyError) as refused:
            with volumeuse.claim_volume(volume(), upload=True):
                pass
        assert (refused.value.volume, refused.value.activity) == ("v.img", "downloaded")
    assert volumeuse._uses == {}
    with volumeuse.claim_volume(volume(), upload=True):
        pass
    assert volumeuse._uses == {}


def test_other_volumes_and_other_uris_are_free() -> None:
    with volumeuse.claim_volume(volume(), upload=True):
        with volumeuse.claim_volume(volume(key="/pool/w.img"), upload=True):
            with volumeuse.claim_volume(volume(uri="test:///b"), upload=True):
                assert len(volumeuse._uses) == 3
        with pytest.raises(VolumeBusyError, match="'v.img' is being uploaded"):
            with volumeuse.claim_volume(volume(), upload=False):
                pass
    assert volumeuse._uses == {}


def test_a_claim_ends_when_its_block_raises() -> None:
    with pytest.raises(RuntimeError):
        with volumeuse.claim_volume(volume(), upload=True):
            raise RuntimeError("the transfer failed")
    assert volumeuse._uses == {}
