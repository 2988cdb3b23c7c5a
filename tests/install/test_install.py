"""`make install` / `make uninstall` (scripts/install.sh) into a temporary root.

Every path the install writes is pointed under ``tmp_path`` (VENV, BINDIR, UNITDIR,
DOCDIR), so a production install on this host (/opt/memd, /usr/local/bin,
/etc/systemd/system) is never touched.  The install runs from a copy of the checkout that
is deleted before anything is checked: the service must not depend on the tree it was
installed from.  The venv is made from /usr/bin/python3, as in production (a pyenv or
home-directory interpreter is hidden from the unit by ProtectHome=).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
# What a development checkout holds besides the sources; none of it is install input.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
)


def _system_python_can_make_venvs() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run(
        [
            str(SYSTEM_PYTHON),
            "-c",
            "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))",
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
    pytest.mark.skipif(
        not _system_python_can_make_venvs(),
        reason="/usr/bin/python3 (3.11+, python3-venv) is needed for the venv",
    ),
]


@dataclass(frozen=True)
class Layout:
    """Where one test's install goes: the make variables of scripts/install.sh."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "opt/memd"

    @property
    def bindir(self) -> Path:
        return self.root / "usr/local/bin"

    @property
    def unitdir(self) -> Path:
        return self.root / "etc/systemd/system"

    @property
    def docdir(self) -> Path:
        return self.root / "usr/share/doc/memd"

    @property
    def unit(self) -> Path:
        return self.unitdir / "memd.service"

    def make(self, source: Path, target: str) -> subprocess.CompletedProcess[str]:
        """Run ``make -C source target`` with every install path under :attr:`root`."""
        argv = [
            "make",
            "--no-print-directory",
            "-C",
            str(source),
            target,
            f"VENV={self.venv}",
            f"BINDIR={self.bindir}",
            f"UNITDIR={self.unitdir}",
            f"DOCDIR={self.docdir}",
        ]
        # Not the outer `make test`'s flags and variables, nor the suite's venv.
        dropped = ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env["PYTHON"] = str(SYSTEM_PYTHON)
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=300, check=False
        )


def _copy_checkout(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=_NOT_SOURCES, symlinks=True)
    return dest


def _install_from_a_copy(tmp: Path) -> Layout:
    layout = Layout(tmp / "root")
    source = _copy_checkout(tmp / "checkout")
    result = layout.make(source, "install")
    assert result.returncode == 0, result.stdout + result.stderr
    shutil.rmtree(source)  # what `git clean` or deleting the clone would do
    return layout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _install_from_a_copy(tmp_path_factory.mktemp("install"))


def _unit_values(unit: Path, key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # cwd elsewhere than the checkout, so nothing can be imported from the source tree.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=clean | env, check=False
    )


def test_memd_runs_from_its_own_venv_after_the_checkout_is_gone(
    installed: Layout, tmp_path: Path
) -> None:
    version = _run(
        [
            str(installed.venv / "bin/python"),
            "-c",
            "import importlib.metadata as m, memd, libvirt; "
            "print(m.version('memd')); print(memd.__file__)",
        ],
        tmp_path,
    )
    assert version.returncode == 0, version.stderr
    dist_version, module_file = version.stdout.split()
    # A real copy in the venv's site-packages, not an editable pointer into a checkout.
    assert Path(module_file).is_relative_to(installed.venv / "lib")

    out = _run([str(installed.bindir / "memd"), "--version"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"memd {dist_version}"
    guest = _run([str(installed.bindir / "memd-guest"), "--help"], tmp_path)
    assert guest.returncode == 0, guest.stderr
    assert "usage: memd-guest" in guest.stdout


def test_commands_on_path_are_symlinks_into_the_venv(installed: Layout) -> None:
    for name in ("memd", "memd-guest"):
        link = installed.bindir / name
        assert link.is_symlink()
        assert link.resolve() == (installed.venv / "bin" / name).resolve()
        assert os.access(link, os.X_OK)


def test_unit_runs_the_venv_and_points_at_installed_docs(installed: Layout) -> None:
    unit = installed.unit
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    memd = str(installed.venv / "bin/memd")
    (start,) = _unit_values(unit, "ExecStart")
    assert start.split()[:2] == [memd, "serve"]
    (stop_post,) = _unit_values(unit, "ExecStopPost")
    assert stop_post.split() == [memd, "ksm-restore"]
    docs = [uri for value in _unit_values(unit, "Documentation") for uri in value.split()]
    assert docs == [f"file://{installed.docdir}/operators.md"]
    assert (installed.docdir / "operators.md").is_file()
    # Nothing the service runs may sit where ProtectHome=/PrivateTmp= hide it (the test's
    # own root is in /tmp; the interpreter behind the venv is what a real install shares).
    base = _run(
        [
            str(installed.venv / "bin/python"),
            "-c",
            "import os, sys; print(os.path.realpath(sys._base_executable))",
        ],
        installed.root,
    )
    assert base.returncode == 0, base.stderr
    assert not re.match(r"^/(home|root|tmp|var/tmp|run/user)/", base.stdout), base.stdout


@pytest.mark.skipif(
    not os.access(SYSTEMD_ANALYZE, os.X_OK),
    reason="systemd-analyze is not installed (scripts/setup.sh --all)",
)
def test_systemd_analyze_verify_accepts_the_installed_unit(
    installed: Layout, tmp_path: Path
) -> None:
    result = _run([SYSTEMD_ANALYZE, "verify", str(installed.unit)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "memd.service" not in result.stderr, result.stderr


def test_stop_post_command_exits_0_when_nothing_was_recorded(
    installed: Layout, tmp_path: Path
) -> None:
    # MEMD_RUN_DIR: an empty run dir, never a live agent's /run/memd record.
    (stop_post,) = _unit_values(installed.unit, "ExecStopPost")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = _run(stop_post.split(), tmp_path, MEMD_RUN_DIR=str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr


def test_upgrade_in_place_then_uninstall_removes_only_what_install_added(tmp_path: Path) -> None:
    layout = _install_from_a_copy(tmp_path / "first")
    # `python -m venv --clear` would delete this: it shows whether the venv was reused.
    sentinel = layout.venv / "sentinel"
    sentinel.write_text("kept\n")
    # Someone else's files next to ours must survive the uninstall.
    neighbour = layout.bindir / "virsh-wrapper"
    neighbour.write_text("#!/bin/sh\n")
    other_doc = layout.docdir.parent / "qemu" / "README"
    other_doc.parent.mkdir(parents=True)
    other_doc.write_text("not memd's\n")

    source = _copy_checkout(tmp_path / "second-checkout")
    # A page the new version no longer ships must not outlive the upgrade.
    assert (layout.docdir / "tmem.md").is_file()
    (source / "docs" / "tmem.md").unlink()
    upgrade = layout.make(source, "install")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    # Same interpreter: the venv was upgraded in place, not recreated.
    assert sentinel.read_text() == "kept\n"
    assert "replacing" not in upgrade.stderr  # our own symlinks are not "someone else's"
    assert not (layout.docdir / "tmem.md").exists()
    assert (layout.docdir / "operators.md").is_file()

    removed = layout.make(source, "uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not layout.venv.exists()
    assert not layout.docdir.exists()
    assert not layout.unit.exists()
    assert not (layout.bindir / "memd").is_symlink()
    assert not (layout.bindir / "memd-guest").is_symlink()
    assert neighbour.read_text() == "#!/bin/sh\n"
    assert other_doc.read_text() == "not memd's\n"
    again = layout.make(source, "uninstall")
    assert again.returncode == 0 and "no memd installed" in again.stdout


def test_install_refuses_an_interpreter_the_unit_cannot_see(tmp_path: Path) -> None:
    # An interpreter under /tmp (PrivateTmp=) stands for pyenv's /root/.pyenv
    # (ProtectHome=): the service would find no Python.  Refused before anything is made.
    hidden_dir = Path(tempfile.mkdtemp(dir="/tmp"))
    hidden = hidden_dir / "python3"
    hidden.write_text("#!/bin/sh\nexit 0\n")
    hidden.chmod(0o755)
    layout = Layout(tmp_path / "root")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    result = subprocess.run(
        [str(REPO / "scripts/install.sh")],
        env=env
        | {
            "PYTHON": str(hidden),
            "VENV": str(layout.venv),
            "BINDIR": str(layout.bindir),
            "UNITDIR": str(layout.unitdir),
            "DOCDIR": str(layout.docdir),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    shutil.rmtree(hidden_dir)
    assert result.returncode != 0
    assert "cannot see" in result.stderr and str(hidden) in result.stderr
    assert not layout.root.exists()
