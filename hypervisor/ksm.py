"""Kernel samepage merging: the ``/sys/kernel/mm/ksm`` knobs and counters, per-process stats.

KSM is the only way two processes' pages come to share a host frame, so it is the
merging engine behind sharing on real guests.  This module reads and writes its sysfs
knobs (``run``, ``pages_to_scan``, ``sleep_millisecs``, ``use_zero_pages``, ...),
snapshots and restores them (tests and benchmarks must leave the host as they found it),
and reads the global counters and ``/proc/<pid>/ksm_stat``.

Counters (kernel names, kept as is): ``pages_shared`` = KSM frames in use,
``pages_sharing`` = extra mappings of them (≈ frames saved), ``pages_unshared`` =
pages scanned but unique, ``pages_volatile`` = pages changing too fast to merge,
``ksm_zero_pages`` = pages merged into the zero page (``use_zero_pages=1``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from memd.errors import BackendError, PermissionDenied, Unavailable

KSM_DIR = Path("/sys/kernel/mm/ksm")

#: ``run`` values.
RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2

#: Knobs restored last, in this order: changing ``merge_across_nodes`` needs no merged
#: pages, and ``run`` decides whether anything happens with the others.
_LAST = ("merge_across_nodes", "run")


def _path(name: str, root: Path) -> Path:
    if "/" in name or name.startswith("."):
        raise BackendError(f"'{name}' is not a KSM knob", target=str(root))
    return root / name


def available(root: Path = KSM_DIR) -> bool:
    return (root / "run").exists()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError as err:
        raise Unavailable(f"{path} does not exist (kernel without KSM?)",
                          target=str(path)) from err
    except PermissionError as err:
        raise PermissionDenied(f"no permission to read {path}", target=str(path)) from err


def _value(text: str) -> int | str:
    """Numbers as int; ``[none] scan-time`` style choices as the selected word."""
    if text.lstrip("-").isdigit():
        return int(text)
    if "[" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text


def read_all(root: Path = KSM_DIR) -> dict[str, int | str]:
    """Every file in the KSM directory (knobs and counters)."""
    if not available(root):
        raise Unavailable("KSM is not available on this kernel", target=str(root))
    return {p.name: _value(_read(p)) for p in sorted(root.iterdir()) if p.is_file()}


def writable_knobs(root: Path = KSM_DIR) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.stat().st_mode & 0o200)


def counters(root: Path = KSM_DIR) -> dict[str, int]:
    """The read-only counters (pages_shared, pages_sharing, full_scans, ...)."""
    knobs = set(writable_knobs(root))
    return {k: v for k, v in read_all(root).items() if k not in knobs and isinstance(v, int)}


def get(name: str, root: Path = KSM_DIR) -> int | str:
    return _value(_read(_path(name, root)))


def set_knob(name: str, value: int | str, root: Path = KSM_DIR) -> None:
    path = _path(name, root)
    try:
        path.write_text(f"{value}\n")
    except PermissionError as err:
        raise PermissionDenied(f"no permission to write {path} (memd must run as root)",
                               target=str(path)) from err
    except FileNotFoundError as err:
        raise Unavailable(f"{path} does not exist", target=str(path)) from err
    except OSError as err:
        raise BackendError(f"the kernel refused {value!r} for {path}: {err.strerror or err}",
                           target=str(path)) from err


def snapshot(root: Path = KSM_DIR) -> dict[str, int | str]:
    """The current value of every writable knob (what :func:`restore` puts back)."""
    return {k: get(k, root) for k in writable_knobs(root)}


def restore(saved: Mapping[str, int | str], root: Path = KSM_DIR) -> None:
    """Put knobs back as :func:`snapshot` found them; only knobs that differ are written."""
    order = [k for k in saved if k not in _LAST] + [k for k in _LAST if k in saved]
    errors = []
    for name in order:
        try:
            if get(name, root) != saved[name]:
                set_knob(name, saved[name], root)
        except BackendError as err:
            errors.append(str(err))
    if errors:
        raise BackendError("could not restore KSM settings: " + "; ".join(errors),
                           target=str(root))


@contextlib.contextmanager
def settings(root: Path = KSM_DIR, **knobs: int | str) -> Iterator[dict[str, int | str]]:
    """Apply knobs for the body of a ``with``, restoring every knob afterwards."""
    saved = snapshot(root)
    try:
        for name in [k for k in knobs if k != "run"] + (["run"] if "run" in knobs else []):
            set_knob(name, knobs[name], root)
        yield saved
    finally:
        restore(saved, root)


def process_stat(pid: int) -> dict[str, int | str]:
    """``/proc/<pid>/ksm_stat`` (ksm_rmap_items, ksm_merging_pages, ksm_zero_pages, ...)."""
    path = Path(f"/proc/{pid}/ksm_stat")
    out: dict[str, int | str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise Unavailable(f"{path} does not exist (process gone, or kernel too old)",
                          target=str(path)) from err
    except PermissionError as err:
        raise PermissionDenied(f"no permission to read {path}", target=str(path)) from err
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        if key:
            out[key] = _value(value.strip())
    return out


def process_merging_pages(pid: int) -> int:
    """``ksm_merging_pages`` of one process (0 when the kernel does not report it)."""
    value = process_stat(pid).get("ksm_merging_pages", 0)
    return value if isinstance(value, int) else 0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass (KSM works in the
    background: its effects are only ever observed, never awaited directly)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def is_root() -> bool:
    return os.geteuid() == 0
