"""The sandbox's pools and volumes: their XML, and removing a pool with its volumes."""

from __future__ import annotations

__all__ = ["pool_xml", "volume_xml", "remove_pool"]

from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import libvirt


def pool_xml(name: str, target: Path) -> str:
    """A dir pool whose folder is ``target``."""
    return (
        f"<pool type='dir'><name>{escape(name)}</name>"
        f"<target><path>{escape(str(target))}</path></target></pool>"
    )


def volume_xml(name: str, capacity: int) -> str:
    """A raw volume of ``capacity`` bytes with nothing allocated."""
    return (
        f"<volume><name>{escape(name)}</name>"
        f"<capacity unit='bytes'>{capacity}</capacity>"
        "<allocation unit='bytes'>0</allocation>"
        "<target><format type='raw'/></target></volume>"
    )


def remove_pool(conn: libvirt.virConnect, name: str) -> Path | None:
    """Delete the pool's volumes, destroy and undefine it; its folder, or None if
    there is no such pool."""
    try:
        handle = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise
    target = Path(ElementTree.fromstring(handle.XMLDesc(0)).findtext("target/path", ""))
    persistent = handle.isPersistent()
    if handle.isActive():
        for vol in handle.listAllVolumes(0):
            vol.delete(0)
        handle.destroy()
    if persistent:
        handle.undefine()
    return target
