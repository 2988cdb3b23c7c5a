"""The image cache's pruning rule, without libvirt or QEMU: the newest images stay, and so does any
older one a libvirt domain's XML boots from (its kernel or initrd), so that ``virsh start`` of a
defined domain never meets a deleted kernel."""

from __future__ import annotations

import os
from pathlib import Path

from hypervisor.vmimage import ImagePaths, _prune, images_in_use, render_domain_xml


def _images(root: Path, count: int) -> list[Path]:
    """``count`` fake image directories, oldest first (mtimes a minute apart)."""
    dirs = []
    for i in range(count):
        image = root / f"digest{i}"
        image.mkdir(parents=True)
        (image / "vmlinux").write_bytes(b"kernel")
        (image / "initrd.img").write_bytes(b"initrd")
        os.utime(image, (1_000_000 + 60 * i, 1_000_000 + 60 * i))
        dirs.append(image)
    return dirs


def _domain_xml(directory: Path, name: str, image: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    paths = ImagePaths(
        kernel=image / "vmlinux",
        initrd=image / "initrd.img",
        manifest=image / "manifest.txt",
        digest=image.name,
    )
    (directory / f"{name}.xml").write_text(
        render_domain_xml(paths, name=name, console_socket=directory / "c.sock")
    )


def _left(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir())


def test_prune_keeps_the_three_newest_when_no_domain_uses_the_rest(tmp_path: Path) -> None:
    images = _images(tmp_path / "cache", 6)
    (tmp_path / "etc").mkdir()
    _prune(tmp_path / "cache", keep=images[5], xml_dirs=[tmp_path / "etc", tmp_path / "absent"])
    assert _left(tmp_path / "cache") == ["digest3", "digest4", "digest5"]


def test_prune_spares_images_that_defined_or_running_domains_boot_from(tmp_path: Path) -> None:
    images = _images(tmp_path / "cache", 6)
    defined, running = tmp_path / "etc-libvirt-qemu", tmp_path / "run-libvirt-qemu"
    _domain_xml(defined, "old-defined", images[0])
    _domain_xml(running, "old-running", images[2])
    # Not domain XML: a subdirectory libvirt keeps there (autostart/, networks/) is not read.
    (defined / "networks").mkdir()
    _prune(tmp_path / "cache", keep=images[5], xml_dirs=[defined, running])
    assert _left(tmp_path / "cache") == ["digest0", "digest2", "digest3", "digest4", "digest5"]
    assert (images[0] / "vmlinux").read_bytes() == b"kernel"


def test_images_in_use_resolves_symlinks_and_xml_escaping(tmp_path: Path) -> None:
    escaped = _images(tmp_path / "a & b", 1)[0]
    linked = _images(tmp_path / "real", 1)[0]
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _domain_xml(tmp_path / "xml", "escaped", escaped)
    _domain_xml(tmp_path / "xml", "via-link", tmp_path / "link" / linked.name)
    assert "a &amp; b/digest0/vmlinux" in (tmp_path / "xml" / "escaped.xml").read_text()
    assert images_in_use([tmp_path / "xml"]) == {escaped.resolve(), linked.resolve()}


def test_prune_deletes_nothing_when_some_domain_xml_cannot_be_read(tmp_path: Path) -> None:
    images = _images(tmp_path / "cache", 5)
    xml_dir = tmp_path / "xml"
    # Reading fails (as a 0600 root file fails for a non-root user): which images are in use is
    # unknown, so none is deleted.
    (xml_dir / "unreadable.xml").mkdir(parents=True)
    assert images_in_use([xml_dir]) is None
    assert images_in_use([tmp_path / "no-such-dir"]) == set()
    assert images_in_use([tmp_path / "cache" / "digest0" / "vmlinux"]) is None  # not a directory
    _prune(tmp_path / "cache", keep=images[4], xml_dirs=[xml_dir])
    assert _left(tmp_path / "cache") == [f"digest{i}" for i in range(5)]
