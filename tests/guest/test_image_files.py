"""The guest image carries the guest agent's files from one list, vm-images/agent-files.txt,
which build.sh installs and hypervisor.vmimage hashes: whatever the agent imports is on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypervisor.vmimage import agent_globs, image_inputs

ROOT = Path(__file__).resolve().parents[2]


def test_the_list_covers_every_module_the_guest_agent_loads() -> None:
    code = (
        "import sys, memd.guest.cli, memd.guest.daemon; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] == 'memd' and getattr(m, '__file__', None)))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    loaded = {Path(f).resolve().relative_to(ROOT) for f in out.stdout.split()}
    listed = {p.relative_to(ROOT) for p in image_inputs(ROOT)}
    assert loaded and loaded <= listed, sorted(loaded - listed)
    assert Path("memd/wire/framing.py") in loaded


def test_build_sh_and_vmimage_read_the_same_list() -> None:
    build = (ROOT / "vm-images" / "build.sh").read_text()
    assert '"$here/agent-files.txt"' in build
    assert "errors.py" not in build and "vocab.py" not in build  # no second list there
    globs = agent_globs(ROOT)
    assert "memd/guest/*.py" in globs and all(not g.startswith("#") for g in globs)
    for pattern in globs:
        assert list(ROOT.glob(pattern)), f"{pattern} matches nothing"
