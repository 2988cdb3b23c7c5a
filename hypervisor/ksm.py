"""Kernel samepage merging: the ``/sys/kernel/mm/ksm`` knobs and counters, per-process stats.

KSM is the only way two processes' pages come to share a host frame, so it is the
merging engine behind sharing on real guests.  This module reads and writes its sysfs
knobs (``run``, ``pages_to_scan``, ``sleep_millisecs``, ``use_zero_pages``, ...),
snapshots and restores them (tests and benchmarks must leave the host as they found it),
and reads the global counters and ``/proc/<pid>/ksm_stat``.

The originals ledger (``record_originals`` / ``restore_originals``): KSM knobs are
host-global and outlive the process that wrote them, so the host's own settings must be
kept where a crash cannot lose them.  Before an agent's first knob write, the writable
knobs as found are written to a small JSON file (``memd.paths.ksm_originals()``: on
tmpfs, because the knobs reset with the host too), with the writer's pid, the time and
the host's boot id.  A ledger found at start means the agent that wrote it did not stop
cleanly: its values, not the current knobs, are the host's originals.  A ledger from
another boot of the host is stale and discarded.  Restoring writes the originals back,
then deletes the ledger; a restore that fails keeps it for the next try.

Counters (kernel names, kept as is): ``pages_shared`` = KSM frames in use,
``pages_sharing`` = extra mappings of them (≈ frames saved), ``pages_unshared`` =
pages scanned but unique, ``pages_volatile`` = pages changing too fast to merge,
``ksm_zero_pages`` = pages merged into the zero page (``use_zero_pages=1``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memd import paths
from memd.errors import BackendError, PermissionDenied, Unavailable

log = logging.getLogger("memd.ksm")

KSM_DIR = Path("/sys/kernel/mm/ksm")
BOOT_ID = paths.HOST_BOOT_ID

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
        raise Unavailable(f"{path} does not exist (kernel without KSM?)", target=str(path)) from err
    except PermissionError as err:
        raise PermissionDenied(f"no permission to read {path}", target=str(path)) from err


def _value(text: str) -> int | str:
    """Numbers as int; ``[none] scan-time`` style choices as the selected word."""
    if text.lstrip("-").isdigit():
        return int(text)
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
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
        raise PermissionDenied(
            f"no permission to write {path} (memd must run as root)", target=str(path)
        ) from err
    except FileNotFoundError as err:
        raise Unavailable(f"{path} does not exist", target=str(path)) from err
    except OSError as err:
        raise BackendError(
            f"the kernel refused {value!r} for {path}: {err.strerror or err}", target=str(path)
        ) from err


def snapshot(root: Path = KSM_DIR) -> dict[str, int | str]:
    """The current value of every writable knob (what :func:`restore` puts back)."""
    return {k: get(k, root) for k in writable_knobs(root)}


def restore(saved: Mapping[str, int | str], root: Path = KSM_DIR) -> None:
    """Put knobs back as :func:`snapshot` found them; only knobs that differ are written."""
    order = [k for k in saved if k not in _LAST] + [k for k in _LAST if k in saved]
    advisor = saved.get("advisor_mode")
    if advisor is not None:
        # While the advisor is on (scan-time) it owns pages_to_scan: the kernel refuses
        # writes to it, and turning the advisor off resets it to the default.  So an
        # advisor that was off goes off first (then pages_to_scan is written), and one
        # that was on comes back last, over a pages_to_scan that is its own anyway.
        order.remove("advisor_mode")
        if advisor == "none":
            order.insert(0, "advisor_mode")
        else:
            order = [k for k in order if k != "pages_to_scan"]
            order.insert(len(order) - sum(k in saved for k in _LAST), "advisor_mode")
    errors = []
    for name in order:
        try:
            if get(name, root) != saved[name]:
                set_knob(name, saved[name], root)
        except BackendError as err:
            errors.append(str(err))
    if errors:
        raise BackendError("could not restore KSM settings: " + "; ".join(errors), target=str(root))


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


# --- the originals ledger ---------------------------------------------------------------

_LEDGER_FORMAT = "memd-ksm-originals/1"


@dataclass(frozen=True)
class Originals:
    """One ledger: the writable knobs as the host had them, and who recorded them."""

    knobs: dict[str, int | str]
    #: The knob directory the values belong to (a test's fake directory is not the host's).
    knob_dir: str
    pid: int
    written_at: float
    boot_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _LEDGER_FORMAT,
            "knobs": self.knobs,
            "knob_dir": self.knob_dir,
            "pid": self.pid,
            "written_at": self.written_at,
            "boot_id": self.boot_id,
        }


def boot_id(path: Path = BOOT_ID) -> str:
    """This boot of the host: the kernel draws a new random UUID at every boot."""
    try:
        return path.read_text().strip()
    except OSError as err:
        raise Unavailable(
            f"cannot read the host's boot id from {path}: {err.strerror or err}", target=str(path)
        ) from err


def load_originals(ledger: Path, root: Path = KSM_DIR) -> Originals | None:
    """The ledger of this host boot, or None if there is none.  A ledger from an earlier
    boot is deleted (the knobs it recorded were reset with the host); an unreadable one,
    or one for another knob directory, raises BackendError."""
    try:
        text = ledger.read_text()
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise PermissionDenied(
            f"no permission to read {ledger} (memd must run as root)", target=str(ledger)
        ) from err
    except OSError as err:
        raise BackendError(
            f"cannot read {ledger}: {err.strerror or err}", target=str(ledger)
        ) from err
    found = _parse_ledger(text, ledger, root)
    if found.boot_id != boot_id():
        log.info("discarding %s: it was written before the host last booted", ledger)
        discard_originals(ledger)
        return None
    if found.knob_dir != str(root):
        raise BackendError(
            f"{ledger} records the knobs of {found.knob_dir}, not of {root}", target=str(ledger)
        )
    return found


def _parse_ledger(text: str, ledger: Path, root: Path) -> Originals:
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _LEDGER_FORMAT:
            raise ValueError(f"format is not {_LEDGER_FORMAT}")
        knobs = data["knobs"]
        if not isinstance(knobs, dict) or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in knobs.values()
        ):
            raise ValueError("knobs are not a map of names to values")
        return Originals(
            {str(k): v for k, v in knobs.items()},
            str(data["knob_dir"]),
            int(data["pid"]),
            float(data["written_at"]),
            str(data["boot_id"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise BackendError(
            f"{ledger} is not a memd KSM ledger ({err}): set the knobs in "
            f"{root} by hand, then delete it",
            target=str(ledger),
        ) from err


def record_originals(ledger: Path, root: Path = KSM_DIR) -> dict[str, int | str]:
    """The host's original knobs, recorded in ``ledger``; call before an agent's first
    knob write.

    A ledger of this host boot that is already there was left by an agent that did not
    stop cleanly (its own settings are still in the knobs): its values are the originals,
    and it stays as it is.  Otherwise the current knobs are the originals, written to a
    new ledger atomically (mode 0600; the directory is created 0750).
    """
    found = load_originals(ledger, root)
    if found is None:
        knobs = snapshot(root)
        if _create_ledger(ledger, Originals(knobs, str(root), os.getpid(), time.time(), boot_id())):
            return knobs
        # Another agent recorded first (two agents, one run directory): its values win.
        found = load_originals(ledger, root)
        if found is None:
            raise BackendError(
                f"{ledger} vanished while memd was recording the KSM knobs", target=str(ledger)
            )
    log.warning("the host's KSM knobs are taken from %s, recorded by %s", ledger, _writer(found))
    return found.knobs


def _writer(found: Originals) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.written_at))
    if found.pid == os.getpid():
        return f"this agent at {when}"
    try:
        os.kill(found.pid, 0)
    except ProcessLookupError:
        return f"agent pid {found.pid} at {when}, which did not stop cleanly"
    except PermissionError:
        pass
    return f"pid {found.pid} at {when}, which still runs"


def _create_ledger(ledger: Path, originals: Originals) -> bool:
    """Write ``ledger`` unless one exists (→ False): temp file, fsync, link, fsync dir."""
    tmp = ledger.with_name(f".{ledger.name}.{os.getpid()}.tmp")
    try:
        ledger.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(originals.to_json(), f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # link, not rename: it fails if a ledger is there instead of replacing the
            # originals another agent recorded, and the name appears complete or not at all.
            os.link(tmp, ledger)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(ledger.parent)
    except PermissionError as err:
        raise PermissionDenied(
            f"no permission to write {ledger} (memd must run as root)", target=str(ledger)
        ) from err
    except OSError as err:
        raise BackendError(
            f"cannot record the KSM knobs in {ledger}: {err.strerror or err}", target=str(ledger)
        ) from err
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_originals(ledger: Path) -> None:
    """Delete the ledger (the knobs are back as recorded, or the record is stale)."""
    try:
        ledger.unlink(missing_ok=True)
    except OSError as err:
        raise BackendError(
            f"cannot delete {ledger}: {err.strerror or err}", target=str(ledger)
        ) from err


def restore_originals(ledger: Path, root: Path = KSM_DIR) -> dict[str, int | str] | None:
    """Put back the knobs recorded in ``ledger``, then delete it; no agent needed (this
    is what ``memd ksm-restore`` runs, e.g. as the unit's ``ExecStopPost=``).

    → the recorded knobs, which the host now has again; None if nothing was recorded (no
    agent changed the knobs since it was last restored, or the ledger is from an earlier
    boot).  If a knob cannot be written, BackendError is raised and the ledger is kept.
    """
    found = load_originals(ledger, root)
    if found is None:
        return None
    restore(found.knobs, root)
    discard_originals(ledger)
    return found.knobs


def process_stat(pid: int) -> dict[str, int | str]:
    """``/proc/<pid>/ksm_stat`` (ksm_rmap_items, ksm_merging_pages, ksm_zero_pages, ...)."""
    path = Path(f"/proc/{pid}/ksm_stat")
    out: dict[str, int | str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise Unavailable(
            f"{path} does not exist (process gone, or kernel too old)", target=str(path)
        ) from err
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
