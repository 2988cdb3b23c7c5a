"""A guest's tmem following a QEMU live migration: transfer rate and switch-over cost.

Two ``memd serve`` agents (each with its own store, run and state directories; mutual TLS
with certificates made by memd tls-init's code) on 127.0.0.1, a source QEMU and a destination
QEMU started with ``-incoming`` (guest-less: SeaBIOS idles; QEMU's RAM migration is real),
each QEMU's swap disk on its agent.  A simulated guest (``GuestClient`` over the source
agent's channel socket) puts ``--mib`` of persistent pages of the tmem_bench mix (35% zero
· 20% duplicates · 35% text · 10% random); ``memd migrate vm1 --to B --qmp`` arms QEMU
(pause-before-switchover); QMP ``migrate`` starts it.

Keys (``--json``):

* ``transfer_gb_per_s`` — guest page bytes (4 KiB a page) of the first full pre-copy pass
  divided by the time it took (the destination installs into its store as it receives:
  TCP back-pressure makes this the end-to-end rate);
* ``memd_downtime_ms`` — what memd adds to QEMU's switch-over: from QEMU's
  ``pre-switchover`` event (guest paused) to the end of ``migrate-continue`` (final delta,
  COMMIT, the destination's install, CONFIRM);
* ``qemu_downtime_ms`` — QEMU's own figure (``query-migrate`` ``downtime``), which counts
  from the guest's stop to its start on the destination and so includes memd's part;
* ``pages``, ``precopy_rounds``, ``total_s`` (arm to done), each agent's CPU time over it
  (``source_agent_cpu_s``, ``destination_agent_cpu_s``: every thread, /proc, 10 ms ticks;
  the `memd migrate` and `memd status` calls it answers included), ``wire_bytes_per_page``
  (the CHUNK frames' bytes per page sent, headers included: a duplicate's payload
  crosses once), and a check that the destination returns every page.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tmem_bench import make_mix

ROOT = Path(__file__).resolve().parent.parent
BOOT_ID = bytes(range(16))


def make_certs(where: Path) -> Path:
    """CA + server (127.0.0.1) + client, in the --tls-dir layout: what `memd tls-init` makes."""
    from memd.migrate import pki

    pki.make_ca(where / "ca", name="bench CA", days=1)
    pki.make_host(where / "ca", where, "localhost", ["127.0.0.1"], days=1)
    return where


class Agent:
    def __init__(self, workdir: Path, port: int, tls: Path, budget: str) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True)
        self.socket, self.channel = workdir / "memd.sock", workdir / "vm1.sock"
        self.swap = workdir / "vm1.swap"
        self.address = f"127.0.0.1:{port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MEMD_RUN_DIR": str(workdir / "run"),
            "MEMD_STATE_DIR": str(workdir / "state"),
        }
        self.env = env
        argv = [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(self.socket),
            "serve",
            "--store",
            str(workdir / "store"),
            "--budget",
            budget,
            "--spill-dir",
            "",
            "--migrate-listen",
            self.address,
            "--tls-dir",
            str(tls),
            "--listen",
            f"vm1={self.channel}",
            "--swap",
            f"vm1={self.swap}:64M",
            "--log-level",
            "warning",
        ]
        self.log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.cli("status")["migrations"]["listening"]:
                    break
            except subprocess.CalledProcessError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not start: {(workdir / 'agent.log').read_text()}")
            time.sleep(0.1)

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "memd.cli", "--socket", str(self.socket), *args, "--json"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )
        return json.loads(out.stdout)

    def cpu_s(self) -> float:
        """The agent process's CPU time so far (every thread, user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Qemu:
    def __init__(self, workdir: Path, swap: Path, incoming: str | None = None) -> None:
        workdir.mkdir(parents=True)
        self.memd_qmp, self.op_qmp = workdir / "memd.qmp", workdir / "op.qmp"
        argv = [
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.memd_qmp},server=on,wait=off",
            "-qmp",
            f"unix:{self.op_qmp},server=on,wait=off",
            "-blockdev",
            f"driver=nbd,node-name=swap0,server.type=unix,server.path={swap},discard=unmap",
            "-device",
            "virtio-blk-pci,drive=swap0",
        ]
        if incoming:
            argv += ["-incoming", incoming]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.op_qmp.exists():
            if time.monotonic() > deadline:
                raise SystemExit("QEMU did not start")
            time.sleep(0.05)
        from hypervisor.qmp import QmpMonitor

        self.qmp = QmpMonitor.connect(str(self.op_qmp))

    def stop(self) -> None:
        self.qmp.execute("quit")
        self.qmp.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run(mib: int) -> dict[str, Any]:
    from memd.guest.client import GuestClient

    npages = mib * 256
    work = Path(tempfile.mkdtemp(prefix="memd-migbench-"))
    agents: list[Agent] = []
    qemus: list[Qemu] = []
    try:
        tls = make_certs(work / "pki")
        port = random.randrange(20000, 60000)
        budget = f"{max(512, 3 * mib)}M"
        a = Agent(work / "a", port, tls, budget)
        agents.append(a)
        b = Agent(work / "b", port + 1, tls, budget)
        agents.append(b)
        src = Qemu(work / "qa", a.swap)
        qemus.append(src)
        mig = work / "mig.sock"
        dst = Qemu(work / "qb", b.swap, incoming=f"unix:{mig}")
        qemus.append(dst)
        pages = make_mix(npages, seed=7)
        with GuestClient.for_unix_socket(str(a.channel), boot_id=BOOT_ID) as g:
            g.connect()
            pool = g.new_pool(persistent=True)
            for start in range(0, npages, 128):
                g.put_batch(
                    pool, [(1, i, pages[i]) for i in range(start, min(npages, start + 128))]
                )
        cpu0 = a.cpu_s(), b.cpu_s()
        t0 = time.monotonic()
        a.cli("migrate", "vm1", "--to", b.address, "--qmp", str(src.memd_qmp))
        src.qmp.execute("migrate", {"uri": f"unix:{mig}"})
        deadline = time.monotonic() + 600
        while True:
            finished = a.cli("status")["migrations"]["finished"]
            if finished:
                result = finished[-1]
                break
            if time.monotonic() > deadline:
                raise SystemExit("the migration did not finish in 10 minutes")
            time.sleep(0.05)
        total = time.monotonic() - t0
        cpu = a.cpu_s() - cpu0[0], b.cpu_s() - cpu0[1]
        while src.qmp.execute("query-migrate").get("status") != "completed":
            if result["phase"] != "done" or time.monotonic() > deadline:
                raise SystemExit(f"migration failed: {result}")
            time.sleep(0.05)
        downtime = src.qmp.execute("query-migrate").get("downtime")
        with GuestClient.for_unix_socket(str(b.channel), boot_id=BOOT_ID) as g:
            g.connect()
            sample = random.Random(1).sample(range(npages), min(npages, 2000))
            ok = all(g.get(pool, 1, i) == pages[i] for i in sample)
        moved = result["first_round_pages"]
        return {
            "mib": mib,
            "pages": npages,
            "transfer_gb_per_s": round(moved * 4096 / 1e9 / result["first_round_s"], 3),
            "transfer_pages_per_s": round(moved / result["first_round_s"]),
            "memd_downtime_ms": result["switchover_ms"],
            "qemu_downtime_ms": downtime,
            "precopy_rounds": result["rounds"],
            "total_s": round(total, 2),
            "source_agent_cpu_s": round(cpu[0], 2),
            "destination_agent_cpu_s": round(cpu[1], 2),
            "wire_bytes_per_page": round(result["wire_bytes"] / max(result["pages"], 1), 1),
            "destination_pages_verified": ok,
            "source_persistent_pages_after": a.cli("status")["tmem"]["persistent_pages"],
        }
    finally:
        for q in qemus:
            try:
                q.stop()
            except Exception:
                q.process.kill()
        for agent in agents:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="persistent pages to move (MiB)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = run(args.mib)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
