"""The memd test guest image: build-once cache, plain QEMU command line, libvirt domain XML.

``vm-images/build.sh`` turns a handful of Debian packages (the kernel that ``linux-image-amd64``
points at, busybox-static, python3-minimal) plus the memd guest agent into ``vmlinux`` and
``initrd.img`` (the kernel is the uncompressed ELF, booted through its PVH entry: seconds
faster under TCG than the bzImage). This module decides when to run it: the image lives in
``$MEMD_IMAGE_CACHE/<digest>/`` (default ``/var/cache/memd/images``), where the digest covers
every input — the vm-images scripts, the guest agent sources and the resolved package versions —
so an unchanged tree costs one ``apt-cache`` call and a few file reads, and any edit rebuilds.

It also owns the one description of how to run that image: :func:`qemu_argv` for QEMU without
libvirt (the serial console on a unix socket), :func:`render_domain_xml` for libvirt (from
``vm-images/domain.xml.in``: ``virsh console`` on a pty, the harness's shell on a second serial
port's unix socket). Both give the guest the memd virtio-serial port :data:`CHANNEL_NAME`. And it
owns the cache's pruning rule: the newest images stay, and so does every image a libvirt domain
boots from (:func:`images_in_use`), since a domain XML names the cached kernel and initrd.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, unescape

from memd.errors import BackendError

CHANNEL_NAME = "org.memd.0"
"""The virtio-serial port name the guest agent looks for."""

READY_MARKER = "MEMD-GUEST-READY"
"""Printed on the serial console by the guest's login shell just before it reads commands."""

KERNEL_CMDLINE = "console=ttyS0 panic=-1 mitigations=off quiet"
"""``panic=-1``: a panicking guest reboots at once instead of hanging a test until its timeout."""

DEFAULT_CACHE = Path("/var/cache/memd/images")
_KEEP_IMAGES = 3  # older image directories are pruned after a build, unless a domain uses them

# Where libvirt's QEMU driver keeps domain XML: the definitions of qemu:///system and the status of
# its running domains (transient ones included), then the same two for qemu:///session.
_SYSTEM_DOMAIN_XML_DIRS = (Path("/etc/libvirt/qemu"), Path("/run/libvirt/qemu"))
_BOOT_FILE = re.compile(r"<(kernel|initrd)>([^<]+)</\1>")

#: The one list of the guest agent's files (vm-images/agent-files.txt): build.sh installs them,
#: image_inputs hashes them.
AGENT_FILES = "agent-files.txt"
# Everything build.sh reads from the tree; a change to any of them means a new image.
_BUILD_FILES = ("build.sh", "init", "inittab", "profile", "memd-port-links", AGENT_FILES)


def agent_globs(src: Path) -> list[str]:
    """The patterns of vm-images/agent-files.txt (relative to ``src``; comments skipped)."""
    lines = (src / "vm-images" / AGENT_FILES).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class ImagePaths:
    """A built image: kernel and initramfs (read-only, shared by every guest booted from them)."""

    kernel: Path
    initrd: Path
    manifest: Path
    digest: str


def source_root() -> Path:
    """The memd source tree holding ``vm-images/`` (the package is installed editable)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "vm-images" / "build.sh").is_file():
        raise BackendError(f"vm-images/build.sh not found next to the memd package in {root}.")
    return root


def cache_dir() -> Path:
    """``$MEMD_IMAGE_CACHE``, else /var/cache/memd/images, else ~/.cache/memd/images (non-root)."""
    configured = os.environ.get("MEMD_IMAGE_CACHE")
    if configured:
        return Path(configured)
    try:
        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        if os.access(DEFAULT_CACHE, os.W_OK):
            return DEFAULT_CACHE
    except PermissionError:
        pass
    return Path.home() / ".cache" / "memd" / "images"


def image_inputs(src: Path) -> list[Path]:
    """Every file whose content goes into the image, sorted (build scripts and agent sources)."""
    files = {src / "vm-images" / name for name in _BUILD_FILES}
    for pattern in agent_globs(src):
        files.update(p for p in src.glob(pattern) if p.is_file())
    return sorted(files)


def package_versions(src: Path) -> list[str]:
    """``package=version`` lines for the Debian packages the build would unpack (candidates)."""
    proc = subprocess.run(
        [str(src / "vm-images" / "build.sh"), "--print-versions"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BackendError(f"cannot resolve the guest image packages: {proc.stderr.strip()}")
    return proc.stdout.split()


def image_digest(src: Path, versions: Sequence[str]) -> str:
    """Content hash of all inputs: any changed script, agent file or package version changes it."""
    h = hashlib.sha256()
    for path in image_inputs(src):
        data = path.read_bytes()
        h.update(f"{path.relative_to(src)}\0{len(data)}\0".encode())
        h.update(data)
    for line in versions:
        h.update(f"pkg\0{line}\0".encode())
    return h.hexdigest()[:16]


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two test sessions starting at once must not build the same image twice or see half of it.
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _paths(image_dir: Path, digest: str) -> ImagePaths:
    return ImagePaths(
        kernel=image_dir / "vmlinux",
        initrd=image_dir / "initrd.img",
        manifest=image_dir / "manifest.txt",
        digest=digest,
    )


def ensure_image(*, cache: Path | None = None, rebuild: bool = False) -> ImagePaths:
    """Return the image for the current inputs, building it first if it is not cached yet.

    The build runs into a temporary directory renamed into place, under a lock: a cached image is
    always complete. Downloaded .debs are kept in ``<cache>/debs`` for later builds.
    """
    src = source_root()
    root = cache if cache is not None else cache_dir()
    digest = image_digest(src, package_versions(src))
    image_dir = root / digest
    with _locked(root):
        if image_dir.is_dir() and not rebuild:
            return _paths(image_dir, digest)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
        try:
            env = dict(os.environ, MEMD_SRC=str(src), MEMD_DEB_CACHE=str(root / "debs"))
            proc = subprocess.run(
                [str(src / "vm-images" / "build.sh"), str(staging)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise BackendError(
                    f"building the guest image failed: {proc.stderr.strip()}", target=str(image_dir)
                )
            staging.chmod(0o755)  # libvirt runs QEMU as libvirt-qemu: it must read the files
            if image_dir.exists():
                shutil.rmtree(image_dir)
            staging.rename(image_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _prune(root, keep=image_dir)
    return _paths(image_dir, digest)


def libvirt_domain_xml_dirs() -> list[Path]:
    """Directories holding libvirt's domain XML files (defined and running domains), system and
    session; those that do not exist are harmless."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    dirs = [*_SYSTEM_DOMAIN_XML_DIRS, Path(config) / "libvirt" / "qemu"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        dirs.append(Path(runtime) / "libvirt" / "qemu" / "run")
    return dirs


def images_in_use(xml_dirs: Sequence[Path]) -> set[Path] | None:
    """Directories (resolved) whose kernel or initrd some libvirt domain boots from, per the
    domain XML files in ``xml_dirs``; None when a file there cannot be read (then nobody can tell
    which images are unused).

    The files are read rather than asked of libvirtd so that the answer does not depend on the
    daemon running or on libvirt-python: a defined domain stays defined while libvirtd is down.
    """
    used: set[Path] = set()
    for directory in xml_dirs:
        # os.listdir, not Path.glob: glob takes an unreadable directory for an empty one.
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".xml"))
        except FileNotFoundError:
            continue  # no libvirt of that kind on this host
        except OSError:
            return None
        for name in names:
            try:
                text = (directory / name).read_text(errors="replace")
            except FileNotFoundError:
                continue  # undefined or stopped meanwhile
            except OSError:
                return None
            for match in _BOOT_FILE.finditer(text):
                used.add(Path(os.path.realpath(unescape(match.group(2).strip()))).parent)
    return used


def _prune(root: Path, *, keep: Path, xml_dirs: Sequence[Path] | None = None) -> None:
    """Delete image directories beyond the :data:`_KEEP_IMAGES` newest (``keep`` counts as one),
    except those a libvirt domain boots from: deleting them would make ``virsh start`` fail on
    a missing kernel. When the domain XML cannot be read (not root), nothing is deleted."""
    images = sorted(
        (d for d in root.iterdir() if d.is_dir() and d != keep and (d / "initrd.img").exists()),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    old = images[_KEEP_IMAGES - 1 :]
    if not old:
        return
    used = images_in_use(libvirt_domain_xml_dirs() if xml_dirs is None else xml_dirs)
    if used is None:
        return
    for image in old:
        if Path(os.path.realpath(image)) not in used:
            shutil.rmtree(image, ignore_errors=True)


def qemu_argv(
    image: ImagePaths,
    *,
    name: str,
    console_socket: Path,
    qmp_socket: Path,
    channels: Mapping[str, Path] | None = None,
    memory_mib: int = 256,
    accel: str = "tcg",
    cpu: str = "max",
    append: str = "",
    start_paused: bool = False,
    pidfile: Path | None = None,
    qemu: str = "qemu-system-x86_64",
    nbd_disks: Sequence[Path] = (),
    reconnect_delay: int = 30,
) -> list[str]:
    """The QEMU command line for one guest, without libvirt.

    ``channels`` maps virtio-serial port names to host unix socket paths (default: just
    :data:`CHANNEL_NAME` at ``<console_socket dir>/<name>.memd.sock``); QEMU listens on every
    socket (server=on, wait=off), the host agent connects. ``-nodefaults`` keeps out NIC, VGA and
    their option ROMs (faster TCG boot); the only serial port is the console socket. Guest RAM is
    plain ``-m`` RAM (``/objects/pc.ram``), which QEMU marks MERGEABLE for KSM by default.
    ``start_paused`` adds ``-S``: connect to the console first, then QMP ``cont``, and no boot
    output is lost.  ``nbd_disks``: virtio disks (``/dev/vda``, ``/dev/vdb``, … in order) served
    over NBD on those unix sockets (memd's swap disks); QEMU waits up to ``reconnect_delay``
    seconds for a server that went away, so an agent restart is a pause in the guest, not I/O
    errors.
    """
    if channels is None:
        channels = {CHANNEL_NAME: console_socket.parent / f"{name}.memd.sock"}
    cmdline = f"{KERNEL_CMDLINE} {append}".strip()
    argv = [
        qemu,
        "-name",
        f"{name},process=qemu-{name}",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        "-chardev",
        f"socket,id=console0,path={console_socket},server=on,wait=off",
        "-serial",
        "chardev:console0",
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vserial0",
    ]
    for index, (port_name, path) in enumerate(channels.items()):
        argv += [
            "-chardev",
            f"socket,id=vport{index},path={path},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vserial0.0,chardev=vport{index},name={port_name}",
        ]
    for index, path in enumerate(nbd_disks):
        argv += [
            "-blockdev",
            f"driver=nbd,node-name=nbd{index},server.type=unix,server.path={path},discard=unmap,"
            f"reconnect-delay={reconnect_delay}",
            "-device",
            f"virtio-blk-pci,drive=nbd{index},id=vdisk{index}",
        ]
    if start_paused:
        argv.append("-S")
    if pidfile is not None:
        argv += ["-pidfile", str(pidfile)]
    return argv


def render_domain_xml(
    image: ImagePaths,
    *,
    name: str,
    console_socket: Path,
    memory_mib: int = 256,
    channel_name: str = CHANNEL_NAME,
    domain_type: str = "qemu",
    append: str = "",
    emulator: str = "/usr/bin/qemu-system-x86_64",
) -> str:
    """libvirt domain XML from ``vm-images/domain.xml.in`` (``type='qemu'`` = TCG).

    The console (``virsh console NAME``) is serial port 0, a pty, ttyS0 in the guest.
    ``console_socket`` is serial port 1 (ttyS1), a unix socket QEMU listens on: the test harness's
    own shell (:class:`tests.hypervisor.vm.console.GuestShell`); its directory must be writable
    by the user
    libvirt runs QEMU as. The memd channel has no path: libvirt chooses it; read it back from the
    live domain XML. The kernel and initrd are named where the image cache holds them: pruning
    skips images a defined or running domain uses.
    """
    template = (source_root() / "vm-images" / "domain.xml.in").read_text()
    values = {
        "NAME": name,
        "DOMAIN_TYPE": domain_type,
        "MEMORY_MIB": str(memory_mib),
        "KERNEL": str(image.kernel),
        "INITRD": str(image.initrd),
        "CMDLINE": f"{KERNEL_CMDLINE} {append}".strip(),
        "CONSOLE_SOCKET": str(console_socket),
        "CHANNEL_NAME": channel_name,
        "EMULATOR": emulator,
    }
    unknown = set(re.findall(r"@([A-Z_]+)@", template)) - values.keys()
    if unknown:
        raise BackendError(f"domain.xml.in has placeholders nobody fills: {sorted(unknown)}.")
    return re.sub(
        r"@([A-Z_]+)@",
        lambda m: escape(values[m.group(1)], {"'": "&apos;", '"': "&quot;"}),
        template,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m hypervisor.vmimage build | argv NAME DIR | domain-xml NAME CONSOLE_SOCKET``."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(
        prog="python3 -m hypervisor.vmimage",
        description="Build the memd test guest image and show how to run it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find cached) and print the kernel and initrd paths")
    p_argv = sub.add_parser("argv", help="print the plain QEMU command line (TCG)")
    p_argv.add_argument("name")
    p_argv.add_argument("dir", type=Path, help="directory for the console, QMP and port sockets")
    p_argv.add_argument("--memory-mib", type=int, default=256)
    p_argv.add_argument("--accel", default="tcg")
    p_xml = sub.add_parser("domain-xml", help="print the libvirt domain XML")
    p_xml.add_argument("name")
    p_xml.add_argument("console_socket", type=Path)
    p_xml.add_argument("--memory-mib", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        image = ensure_image()
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(f"kernel={image.kernel}\ninitrd={image.initrd}\nmanifest={image.manifest}")
    elif args.command == "argv":
        directory = args.dir.resolve()
        print(
            shlex.join(
                qemu_argv(
                    image,
                    name=args.name,
                    memory_mib=args.memory_mib,
                    accel=args.accel,
                    console_socket=directory / f"{args.name}.console.sock",
                    qmp_socket=directory / f"{args.name}.qmp.sock",
                )
            )
        )
    else:
        print(
            render_domain_xml(
                image,
                name=args.name,
                console_socket=args.console_socket,
                memory_mib=args.memory_mib,
            ),
            end="",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
