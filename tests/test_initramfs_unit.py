"""The test guest's boot files: kernel choice, module order, the newc archive (no daemon)."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from aiovirtstream.pytest_plugin import require_test_guest
from aiovirtstream.testing import GuestPackageMissingError
from aiovirtstream.testing._initramfs import (
    VIRTIO_MODULES,
    build_initramfs,
    find_kernel,
    kernel_modules_dir,
)


def newc_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """``{name: (mode, data)}`` of a newc cpio archive, read as the kernel reads it."""
    entries: dict[str, tuple[int, bytes]] = {}
    at = 0
    while True:
        head = archive[at : at + 110]
        assert head[:6] == b"070701", f"no newc header at {at}"
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_at = at + 110
        name = archive[name_at : name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_at : data_at + size])
        at = data_at + size + (-size % 4)


def fake_boot(tmp_path: Path, kernels: dict[str, bool]) -> tuple[Path, Path]:
    """A /boot with ``vmlinuz-<version>`` files and a /lib/modules with the folders asked for."""
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    modules.mkdir()
    for version, has_modules in kernels.items():
        (boot / f"vmlinuz-{version}").write_bytes(b"kernel")
        if has_modules:
            (modules / version / "kernel").mkdir(parents=True)
    return boot, modules


def test_the_newest_cloud_kernel_with_modules_is_chosen(tmp_path: Path) -> None:
    boot, modules = fake_boot(
        tmp_path,
        {
            "6.1.0-30-amd64": True,  # newer, but not a cloud kernel
            "6.1.0-9-cloud-amd64": True,
            "6.1.0-10-cloud-amd64": True,  # 10 > 9: versions compare as numbers
            "6.1.0-11-cloud-amd64": False,  # no modules: unusable
        },
    )
    kernel = find_kernel(boot=boot, modules_root=modules)
    assert kernel == boot / "vmlinuz-6.1.0-10-cloud-amd64"
    assert kernel_modules_dir(kernel, modules_root=modules) == modules / "6.1.0-10-cloud-amd64"


def test_another_kernel_is_the_fallback(tmp_path: Path) -> None:
    boot, modules = fake_boot(tmp_path, {"6.1.0-9-amd64": True, "6.1.0-12-amd64": True})
    assert find_kernel(boot=boot, modules_root=modules) == boot / "vmlinuz-6.1.0-12-amd64"


def test_no_usable_kernel_names_the_package(tmp_path: Path) -> None:
    boot, modules = fake_boot(tmp_path, {"6.1.0-9-cloud-amd64": False})
    with pytest.raises(GuestPackageMissingError, match="linux-image-cloud-amd64"):
        find_kernel(boot=boot, modules_root=modules)
    with pytest.raises(GuestPackageMissingError, match="no modules folder"):
        kernel_modules_dir(boot / "vmlinuz-6.1.0-9-cloud-amd64", modules_root=modules)


def test_the_initramfs_holds_busybox_the_modules_in_order_and_init(tmp_path: Path) -> None:
    require_test_guest()
    path = build_initramfs(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    entries = newc_entries(gzip.decompress(path.read_bytes()))
    mode, init = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert entries["bin/busybox"][1] == Path("/bin/busybox").read_bytes()
    assert stat.S_ISCHR(entries["dev/console"][0])
    mode, target = entries["bin/sh"]
    assert stat.S_ISLNK(mode) and target == b"/bin/busybox"
    loaded = init.decode().split("for m in ", 1)[1].split(";", 1)[0].split()
    assert {f"lib/modules/{name}.ko" for name in loaded} <= entries.keys()
    assert set(VIRTIO_MODULES) <= set(loaded) | builtin_modules()
    # modules.dep order: a module comes after every module it needs (built-in
    # ones, as virtio_ring is on Debian 13's kernel, need no loading)
    needs = module_dependencies()
    for at, name in enumerate(loaded):
        assert set(needs.get(name, [])) & set(loaded) <= set(loaded[:at]), name


def test_an_initramfs_already_built_is_reused_and_a_link_is_not_followed(tmp_path: Path) -> None:
    require_test_guest()
    first = build_initramfs(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_initramfs(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    # A link planted where the next build writes is replaced, its target untouched.
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    other = tmp_path / "other"
    other.mkdir()
    (other / first.name).symlink_to(victim)
    fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    try:
        built = build_initramfs(other, dir_fd=fd)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"keep"
    assert not built.is_symlink() and built.read_bytes() == first.read_bytes()


def _module_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def module_dependencies() -> dict[str, list[str]]:
    """What each module of the guest's kernel needs, from its ``modules.dep``."""
    needs: dict[str, list[str]] = {}
    for line in (kernel_modules_dir(find_kernel()) / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        needs[_module_name(target)] = [_module_name(dep) for dep in rest.split()]
    return needs


def builtin_modules() -> set[str]:
    """Modules the running kernel has built in (the initramfs needs no file for them)."""
    folder = kernel_modules_dir(find_kernel())
    builtin = folder / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {_module_name(line) for line in builtin.read_text().split()}
