"""An autoscaling Ray cluster on this machine, made from cluster.yaml with Ray's `fake_multinode` node provider.

The provider stands in for AWS only: the node types, their min/max workers, the idle timeout and the autoscaler are
cluster.yaml's and Ray's own; each worker node the autoscaler adds is a real raylet (ray._private.node.Node) with the
node type's resources, where the cloud GPU is stood in for by the node type's custom resource (accel_a10g, ...).

`ray up` cannot start this provider (tested with Ray 2.60; see README, "Run on a GPU cluster"), so the head is started
the way Ray's own autoscaler tests do: `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=<variant> --block`.
Everything runs in one new session (process group) that `stop` ends, so no `ray stop` (which would end every Ray on
the machine) is needed.

    python tests/fake_cluster.py --try-ray-up     # what `ray up` does with the fake variant of cluster.yaml
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HEAD_TYPE = "ray.head.default"  # the fake provider's head always has this node type
# CPU counts of the stood-in instances are scaled down to what a 2-core CI machine can run (AWS detects them)
FAKE_RESOURCES = {"gpu_a10g": {"CPU": 1, "accel_a10g": 1}, "gpu_l40s": {"CPU": 1, "accel_l40s": 2}}
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def variant(cluster: dict, gcs_address: str, head_cpus: int = 1, idle_timeout_minutes: float = 2.0) -> dict:
    """cluster.yaml with the AWS provider replaced by fake_multinode: same worker types, min/max and autoscaling.

    Setup and start commands, file mounts and node_config are AWS machinery (SSH, pip, EC2): the fake provider runs
    no updaters, so they are emptied; the worker types keep their names, limits and custom resources."""
    c = copy.deepcopy(cluster)
    c["provider"] = {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True}
    head = c["available_node_types"].pop(c["head_node_type"])
    c["available_node_types"] = {HEAD_TYPE: {"resources": {**head.get("resources", {}), "CPU": head_cpus},
                                             "node_config": {}, "max_workers": 0},
                                 **c["available_node_types"]}
    for name, nt in c["available_node_types"].items():
        nt["node_config"] = {}
        if name in FAKE_RESOURCES:
            nt["resources"] = {**nt["resources"], **FAKE_RESOURCES[name]}
    c["head_node_type"] = HEAD_TYPE
    c["idle_timeout_minutes"] = idle_timeout_minutes
    c.update({k: [] for k in COMMAND_KEYS})
    c.update({"auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
              "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []})
    return c


class FakeCluster:
    """The head of an autoscaling fake cluster, started from a variant of cluster.yaml; `stop` ends all its nodes."""

    def __init__(self, workdir: Path, head_cpus: int = 1, idle_timeout_minutes: float = 2.0):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"{node_ip()}:{self.port}"
        self.config_path = self.dir / "fake-cluster.yaml"
        cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
        self.config = variant(cluster, self.address, head_cpus, idle_timeout_minutes)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.temp_dir = self.dir / "ray"
        self.proc: subprocess.Popen | None = None
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": "token"}

    def start(self, timeout: float = 90.0) -> "FakeCluster":
        ensure_token()
        dash = free_port()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
               f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--num-cpus={self.config['available_node_types'][HEAD_TYPE]['resources']['CPU']}",
               f"--temp-dir={self.temp_dir}", f"--autoscaling-config={self.config_path}"]
        self.log = open(self.dir / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: "
                                   f"{(self.dir / 'head.log').read_text()[-3000:]}")
            if self.monitor_log().exists() and _answers(dash) and _answers(self.port):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the fake cluster's head did not come up in {timeout:.0f} s")

    def monitor_log(self) -> Path:
        return self.temp_dir / "session_latest" / "logs" / "monitor.log"

    def added_nodes(self) -> list[str]:
        """The autoscaler's own record of the worker nodes it launched, by node type."""
        log = self.monitor_log().read_text() if self.monitor_log().exists() else ""
        out = []
        for line in log.splitlines():
            if ":event_summary:Adding" in line:  # "...:event_summary:Adding 1 node(s) of type gpu_a10g."
                words = line.split(":event_summary:Adding ", 1)[1].split()
                out += [words[-1].rstrip(".")] * int(words[0])
        return out

    def stop(self, grace: float = 5.0) -> None:
        """End the head and every node the autoscaler started (all in this cluster's session)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            _signal_session(sid, sig)
            deadline = time.time() + wait
            while time.time() < deadline and _session_pids(sid):
                time.sleep(0.5)
            if not _session_pids(sid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        self.proc = None


def ensure_token() -> None:
    """Token authentication stays on for the test cluster (it listens on the machine's address): make sure a token
    exists where Ray looks for one (`ray get-auth-token --generate` only writes one if there is none)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                   capture_output=True, timeout=60)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0 or s.connect_ex((node_ip(), port)) == 0


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies are gone already
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def _signal_session(sid: int, sig: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def try_ray_up(workdir: Path) -> dict:
    """Run `ray up` (and `ray down`) on the fake variant of cluster.yaml; report what happened. Harmless: the variant
    has no commands (nothing such as `ray stop` can run), and `ray up` fails before it launches anything."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = variant(yaml.safe_load((ROOT / "cluster.yaml").read_text()), f"{node_ip()}:{free_port()}")
    path = workdir / "fake-cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1"}
    out = {}
    for verb in (["up", "-y"], ["down", "-y", "--workers-only"]):
        p = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *verb, str(path)], env=env,
                           capture_output=True, text=True, timeout=120)
        text = (p.stdout + p.stderr).strip().splitlines()
        out[verb[0]] = {"rc": p.returncode, "last_line": text[-1] if text else ""}
    return out


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--try-ray-up", action="store_true", help="run `ray up` / `ray down` on the fake variant")
    args = ap.parse_args()
    if args.try_ray_up:
        print(json.dumps(try_ray_up(Path(tempfile.mkdtemp(prefix="fake-ray-up-"))), indent=2))
