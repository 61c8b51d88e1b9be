"""A real one-node SLURM for the tests: Debian's `munged`, `slurmctld` and `slurmd`, configured in a private directory.

Nothing outside that directory is touched: munge gets its own key and socket, SLURM its own configuration, ports,
state and logs, and the tests reach it through `SLURM_CONF`. `.ci/run` installs the packages (`slurm-wlm`, `munge`);
where they are missing or the daemons cannot start, `start` says why and the tests that need the cluster are skipped
with that reason.
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def config_text(directory: Path, host: str, user: str) -> str:
    return f"""\
ClusterName=trlthrtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={directory}/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
ReturnToService=2
MpiDefault=none
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb() * 3 // 4} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A started one-node cluster: `env` reaches it; `stop()` ends its daemons."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.env = {"SLURM_CONF": str(directory / "slurm.conf")}

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60,
                              **kwargs)

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.directory / "log" / f"{name}.log"
        return " | ".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(no log)"

    def stop(self) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.directory / pid_file
            try:
                os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
                pass
        time.sleep(1)


def start(directory: Path) -> tuple[Cluster | None, str]:
    """Start the cluster in `directory`: `(cluster, "")`, or `(None, why it could not start)`."""
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(name) is None
               and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        return None, f"SLURM is not installed here ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    for sub in ("state", "spool", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    key = directory / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host, user = socket.gethostname(), getpass.getuser()
    (directory / "slurm.conf").write_text(config_text(directory, host, user))
    cluster = Cluster(directory)
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
    steps = [
        [sbin("munged"), "--force", f"--socket={directory}/munge.socket", f"--key-file={key}",
         f"--pid-file={directory}/munged.pid", f"--log-file={directory}/log/munged.log",
         f"--seed-file={directory}/munge.seed"],
        [sbin("slurmctld"), "-f", str(directory / "slurm.conf")],
        [sbin("slurmd"), "-f", str(directory / "slurm.conf")],
    ]
    for name, command in zip(DAEMONS, steps):
        started = cluster.run(*command)
        if started.returncode != 0:
            cluster.stop()
            return None, f"{name} did not start: {(started.stderr or started.stdout).strip()[:300]} " \
                         f"{cluster.log_tail(name)}"
    deadline = time.time() + 60
    while time.time() < deadline:
        state = cluster.run("sinfo", "--noheader", "--format=%T")
        if state.returncode == 0 and state.stdout.strip() in ("idle", "mixed", "allocated"):
            return cluster, ""
        time.sleep(0.5)
    cluster.stop()
    return None, f"the node did not come up within 60 s: {cluster.log_tail('slurmctld')} {cluster.log_tail('slurmd')}"
