"""Fixtures for real-VM tests: the guest image (built once per input set) and booted guests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import ImagePaths, ensure_image

from .harness import GuestVM, qemu_available


@pytest.fixture(scope="session")
def vm_image() -> ImagePaths:
    """The guest kernel + initramfs; built on first use, then cached by a hash of its inputs."""
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh --all)")
    return ensure_image()


@pytest.fixture
def boot_guest(
    vm_image: ImagePaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GuestVM]]:
    """Factory: ``boot_guest(name=..., memory_mib=..., ports=...)`` boots a guest and returns it
    ready for commands; every guest it booted is stopped at teardown."""
    guests: list[GuestVM] = []

    def boot(**kwargs: Any) -> GuestVM:
        # Short directory: unix socket paths are limited to 107 bytes.
        workdir = Path(tmp_path_factory.mktemp("vm", numbered=True))
        guest = GuestVM(vm_image, workdir, **kwargs)
        guests.append(guest)
        guest.start()
        return guest

    yield boot
    for guest in guests:
        guest.stop()
