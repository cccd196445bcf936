"""The sandbox's storage helpers: pools and sparse volumes, sync and async."""

from __future__ import annotations

from _helpers.volumes import MiB

from aiovirtstream.testing import PoolInfo, Sandbox


def test_helpers_create_pool_and_sparse_volume() -> None:
    with Sandbox() as sb:
        pool = sb.create_pool("helpers")
        assert pool == PoolInfo("helpers", sb.path / "pools" / "helpers")
        vol = sb.create_volume(pool, "disk.img", 10 * MiB)
        assert vol.path == pool.path / "disk.img"
        assert vol.capacity == 10 * MiB
        st = vol.path.stat()
        assert st.st_size == 10 * MiB
        assert st.st_blocks * 512 < 64 * 1024, "the volume should be sparse"
        with sb.connect() as conn:
            assert conn.storageVolLookupByPath(str(vol.path)).info()[1] == 10 * MiB
        sb.delete_pool(pool)
        assert not pool.path.exists()
        with sb.connect() as conn:
            assert "helpers" not in [p.name() for p in conn.listAllStoragePools(0)]
        sb.delete_pool(pool)  # already gone: no error


async def test_async_helpers() -> None:
    async with Sandbox(tcp=True) as sb:
        pool = await sb.acreate_pool("apool")
        vol = await sb.acreate_volume(pool, "a.img", 3 * MiB)
        with sb.connect(tcp=True) as conn:
            assert conn.storageVolLookupByPath(str(vol.path)).info()[1] == 3 * MiB
        await sb.adelete_pool(pool)
        assert not pool.path.exists()
