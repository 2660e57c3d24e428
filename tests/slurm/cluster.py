"""A real two-node Slurm cluster on this machine, for tests: slurmctld plus two slurmd daemons
(nodes n1 and n2, both 127.0.0.1 on their own ports), no munge (auth/none), in a private folder.

Job credentials live 10 s instead of Slurm's default 120 s. A requeued job is held for the credential
lifetime, so that nodes have dropped the old incarnation's revoked credential before it starts again;
starting it earlier fails it ("Job credential revoked"). The short lifetime, and a scheduling pass every 2 s
instead of 60 s (nothing else wakes the scheduler when a held job's begin time passes), keep the requeue
test short without that race.

Only the daemons started here are stopped afterwards, by the PIDs recorded at start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol")


def slurm_available() -> bool:
    return all(shutil.which(d) for d in DAEMONS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    conf: Path
    processes: list[subprocess.Popen]

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update(extra)
        return env

    def run(self, *command: str, timeout: int = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self.env())

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")

    def stop(self) -> None:
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_cluster(folder: Path, cpus_per_node: int = 2) -> Cluster:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool/n1", "spool/n2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ports = [_free_port() for _ in range(3)]
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=adyolotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs={cpus_per_node} RealMemory=4000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs={cpus_per_node} RealMemory=4000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    log = open(folder / "daemons.out", "w")
    processes = [subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=log, stderr=subprocess.STDOUT)]
    time.sleep(1)
    for node in ("n1", "n2"):
        processes.append(subprocess.Popen(["slurmd", "-D", "-N", node], env=env, stdout=log, stderr=subprocess.STDOUT))
    cluster = Cluster(folder, conf, processes)
    deadline = time.time() + 60
    while time.time() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        if states.count("idle") == 2:
            return cluster
        time.sleep(1)
    cluster.stop()
    raise RuntimeError(f"the test Slurm cluster did not come up; see {folder}/slurmctld.log and slurmd-*.log")
