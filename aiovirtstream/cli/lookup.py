"""Finding what the command line names: the connection, pools (name or UUID), volumes
(name, path or key) and domains (name, UUID or id)."""

from __future__ import annotations

__all__ = ["connection", "find_volume", "find_domain", "resolve_uri"]

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import anyio.to_thread
import libvirt

import aiovirtstream as avs

from .errors import CommandError


def resolve_uri(uri: str | None) -> str | None:
    """``-c URI``, else ``$LIBVIRT_DEFAULT_URI`` (named in errors), else libvirt's default."""
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or None


@contextlib.asynccontextmanager
async def connection(uri: str | None) -> AsyncIterator[libvirt.virConnect]:
    """A connection opened with :func:`aiovirtstream.connect`, closed on exit."""
    conn = await avs.connect(resolve_uri(uri))
    try:
        yield conn
    finally:
        with anyio.CancelScope(shield=True):
            await avs.aclose_connection(conn)


def _pool_name(conn: libvirt.virConnect, pool: str) -> str:
    """The name of ``pool``, given by name or UUID (worker thread)."""
    try:
        as_uuid = str(uuid.UUID(pool))
    except ValueError:
        return pool
    try:
        return str(conn.storagePoolLookupByUUIDString(as_uuid).name())
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
    return pool  # a pool named like a UUID


def _volume_by_name(conn: libvirt.virConnect, name: str) -> str | None:
    """The one active pool holding a volume ``name`` (worker thread); None if none does."""
    holders = []
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        try:
            pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            continue
        holders.append(str(pool.name()))
    if len(holders) > 1:
        raise CommandError(
            f"volume {name!r} is in several pools ({', '.join(sorted(holders))}): "
            "name one with --pool"
        )
    return holders[0] if holders else None


async def find_volume(
    conn: libvirt.virConnect, volume: str, pool: str | None
) -> tuple[libvirt.virStorageVol, str | None]:
    """The volume and its pool's name: by name in ``pool`` (a name or a UUID), else by
    path or key, else by name in the one active pool that has it."""
    if pool is not None:
        with avs.map_libvirt_errors(context=f"cannot find pool {pool!r}"):
            pool = await anyio.to_thread.run_sync(_pool_name, conn, pool)
        try:
            return await avs.lookup_volume(conn, volume, pool=pool), pool
        except avs.NotFoundError as error:
            if error.code != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            raise CommandError(
                f"no storage pool {pool!r} (by name or UUID): list them with virsh pool-list"
            ) from error
    try:
        return await avs.lookup_volume(conn, volume), None
    except avs.NotFoundError:
        if volume.startswith("/"):
            raise
        with avs.map_libvirt_errors(context="cannot list the storage pools"):
            holder = await anyio.to_thread.run_sync(_volume_by_name, conn, volume)
        if holder is None:
            raise CommandError(
                f"no volume {volume!r}: not a path, a key, nor a volume name in an active "
                "pool (list them with virsh vol-list POOL)"
            ) from None
        return await avs.lookup_volume(conn, volume, pool=holder), holder


async def find_domain(conn: libvirt.virConnect, domain: str) -> libvirt.virDomain:
    """A domain by name or UUID, or by id (a number that names no domain)."""
    try:
        return await avs.lookup_domain(conn, domain)
    except avs.NotFoundError:
        if not domain.isdigit():
            raise
        try:
            return await anyio.to_thread.run_sync(conn.lookupByID, int(domain))
        except libvirt.libvirtError:
            pass
        raise
