"""A real single-node SLURM on loopback for the ``cluster`` tests.

Recipe: ``../shared/notes/slurm.md``. The harness installs ``slurm-wlm`` and ``munge`` with apt
when they are missing, starts ``munged`` (unless one already answers), then ``slurmctld`` and
``slurmd`` with a temporary ``slurm.conf`` (ports chosen free, every path inside a temporary
directory), waits for ``sinfo`` to show the node idle, and stops what it started by the pids in
the pid files. When it cannot run (no apt, not root, no network for the install) it skips with a
printed reason.

Use the session fixture ``slurm`` (import it into a test module)::

    from slurm_harness import slurm  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

PACKAGES = ("slurm-wlm", "munge")
START_TIMEOUT = 60.0


class HarnessUnavailable(RuntimeError):
    """SLURM cannot be set up on this machine; the message says why (the tests skip with it)."""


@dataclass
class SlurmNode:
    """A running one-node SLURM: its config file, partition and working directory."""

    conf: Path
    root: Path
    partition: str = "debug"
    hostname: str = ""

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], *, timeout: float = 30, env: dict | None = None, check: bool = True):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=check)


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when missing (root only)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sinfo", "sbatch", "munged")):
        return
    if shutil.which("apt-get") is None:
        raise HarnessUnavailable("slurm-wlm is not installed and apt-get is unavailable")
    if os.geteuid() != 0:
        raise HarnessUnavailable("slurm-wlm is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, timeout in ((["apt-get", "update"], 300), (["apt-get", "install", "-y", *PACKAGES], 600)):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise HarnessUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")


def _munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        cred = _run(["munge", "-n"], timeout=10, check=False)
        if cred.returncode != 0:
            return False
        out = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, text=True, timeout=10)
        return out.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munge() -> int | None:
    """Start munged unless one already answers; return the pid we started (or None)."""
    if _munge_works():
        return None
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _munge_works():
            pid_file = run_dir / "munged.pid"
            return int(pid_file.read_text().strip()) if pid_file.exists() else None
        time.sleep(0.2)
    raise HarnessUnavailable("munged started but `munge -n | unmunge` does not work")


def write_conf(root: Path, hostname: str) -> Path:
    """A one-node slurm.conf on 127.0.0.1 with every path inside ``root``."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    mem_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=slidepipe-test",
                f"SlurmctldHost={hostname}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "ReturnToService=2",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                "InactiveLimit=0",
                "KillWait=5",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
                f"PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _wait_idle(node: SlurmNode, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = _run(["sinfo", "-h", "-N", "-o", "%t"], env=node.env(), check=False, timeout=10)
        last = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 and last.split() and all(s.startswith("idle") for s in last.split()):
            return
        time.sleep(0.5)
    logs = node.root / "log"
    tails = {p.name: p.read_text()[-800:] for p in logs.glob("*.log")}
    raise HarnessUnavailable(f"SLURM node not idle after {timeout:.0f} s (sinfo: {last!r}); logs: {tails}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_pid(pid: int | None, timeout: float = 10.0) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_slurm() -> Iterator[SlurmNode]:
    """Install if needed, start munged + slurmctld + slurmd, yield the node, stop the daemons."""
    if sys.platform != "linux":
        raise HarnessUnavailable("the SLURM harness runs on Linux only")
    ensure_installed()
    munge_pid = start_munge()
    hostname = socket.gethostname().split(".")[0]
    root = Path(tempfile.mkdtemp(prefix="slidepipe-slurm-"))
    node = SlurmNode(conf=write_conf(root, hostname), root=root, hostname=hostname)
    env = node.env()
    old_conf = os.environ.get("SLURM_CONF")
    try:
        _run(["slurmctld", "-f", str(node.conf)], env=env)
        _run(["slurmd", "-f", str(node.conf)], env=env)
        _wait_idle(node)
        os.environ["SLURM_CONF"] = str(node.conf)
        yield node
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        # Cancel leftover jobs, then stop the daemons we started, by pid file (never by name).
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(["scancel", "--partition", node.partition], env=env, check=False, timeout=10)
        _stop_pid(_pid(root / "slurmd.pid"))
        _stop_pid(_pid(root / "slurmctld.pid"))
        _stop_pid(munge_pid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmNode]:
    """Session fixture: a running one-node SLURM, or a skip with the printed reason."""
    with contextlib.ExitStack() as stack:
        try:
            node = stack.enter_context(running_slurm())
        except (HarnessUnavailable, subprocess.SubprocessError, OSError) as err:
            reason = f"SLURM harness unavailable: {err}"
            print(reason, file=sys.stderr)
            pytest.skip(reason)
        yield node
