"""Faults provoked for real on real searches: the driver killed with SIGKILL and resumed, Train workers killed, SIGTERM
and a second signal, a 200-trial load, secrets planted in the environment, memory across sequential trials.

Each search runs `python -m search.run` as a subprocess with its own Ray temp dir (RAY_TMPDIR), so the test can count
the Ray processes of that search alone (other Ray clusters may run on the same machine) by their command lines and
open files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

SECRETS = {"HF_TOKEN": "hf_qlorasecret0123456789", "AWS_SECRET_ACCESS_KEY": "awsqlorasecret0123456789",
           "MLFLOW_TRACKING_PASSWORD": "mlflowqlorasecret0123456789", "WANDB_API_KEY": "wandbqlorasecret0123456789",
           "AWS_SESSION_TOKEN": "awssessionqlorasecret0123"}


# ---------------------------------------------------------------------------------------------------------------
# helpers


class Search:
    """One search as a subprocess: its argv, environment, Ray temp dir, MLflow store and output folder."""

    def __init__(self, work: Path, name: str, sets: list[str], secrets: bool = False):
        self.work, self.name = work, name
        self.runs = work / "runs"
        self.db = f"sqlite:///{work / 'mlflow.db'}"
        # short: Ray's unix socket paths live under it
        self.ray_tmp = tempfile.mkdtemp(prefix="qrt", dir="/tmp")
        self.argv = [sys.executable, "-m", "search.run", "--name", name, "--set", f"output_dir={self.runs}",
                     "--set", f"mlflow.tracking_uri={self.db}"] + [a for s in sets for a in ("--set", s)]
        self.env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    **(SECRETS if secrets else {})}
        self.log = open(work / f"{name}.log", "ab")
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv + list(extra), env=self.env, cwd=self.work, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def run(self, *extra: str, timeout: float = 600) -> int:
        self.start(*extra)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return (self.work / f"{self.name}.log").read_text(errors="replace")

    def wait_for(self, cond, timeout: float, what: str, poll: float = 0.5):
        end = time.time() + timeout
        while time.time() < end:
            value = cond()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"search exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            time.sleep(poll)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.db)

    def children(self) -> list:
        if "results in" not in self.output():  # the driver creates the MLflow store first; never race it
            return []
        c = self.client()
        exp = c.get_experiment_by_name("qlora-search")
        if exp is None:
            return []
        return c.search_runs([exp.experiment_id], "tags.`qlora.role` = 'trial'", max_results=1000)

    def steps(self, run) -> list[int]:
        return [m.step for m in sorted(self.client().get_metric_history(run.info.run_id, "val_f1"),
                                       key=lambda m: (m.timestamp, m.step))]

    def summary(self) -> dict:
        return json.loads((self.runs / self.name / "summary.json").read_text())

    def ray_processes(self) -> list[psutil.Process]:
        return ray_processes(self.ray_tmp)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.ray_processes():  # never leave ours behind, even when an assertion failed
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Live processes whose command line or open files point into this search's Ray temp dir."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(ray_tmp in a for a in p.info["cmdline"] or []) or any(
                    f.path.startswith(ray_tmp) for f in p.open_files()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes under a driver (Ray's workers are children of the raylet it started)."""
    try:
        tree = psutil.Process(driver_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in tree:
        try:
            if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker") and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def tree_rss(pid: int) -> dict[int, int]:
    """RSS of the processes in the driver's tree that live through the whole search (the driver, raylet, GCS,
    dashboard, agents), by pid. Ray's worker processes (titled `ray::...`: idle pool workers, trial actors, Train
    controllers and workers) are left out: an idle pool worker at one sample can be the next trial's Train worker,
    model loaded, at the next."""
    out = {}
    for p in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        try:
            if p.pid == pid or not " ".join(p.cmdline()[:1]).startswith("ray::"):
                out[p.pid] = p.memory_info().rss
        except psutil.Error:
            pass
    return out


def real_trial_sets(tiny_model, sms_subset, **over) -> list[str]:
    sets = {"space": str(ROOT / "spaces" / "classification.yaml"), "trial.model.name_or_path": str(tiny_model),
            "trial.data.path": str(sms_subset), "trial.optim.max_steps": 6, "trial.optim.batch_size": 8,
            "trial.eval.every_steps": 3, "trial.eval.max_examples": 24, "trial.data.max_length": 96,
            "scheduler.grace_period": 2, "max_concurrent_trials": 1, **over}
    return [f"{k}={v}" for k, v in sets.items()]


def standin_sets(tiny_model, sms_subset, **over) -> list[str]:
    # a real model directory and data file: preflight checks them as for any search (the stand-in loads neither)
    sets = {"trainable": "trainables.standin:run_trial", "scheduler.type": "none",
            "trial.model.name_or_path": str(tiny_model), "trial.data.path": str(sms_subset), **over}
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture
def searches():
    made: list[Search] = []
    yield made
    for s in made:
        s.close()


# ---------------------------------------------------------------------------------------------------------------
# resume after SIGKILL (real QLoRA trials), no duplicates, searcher and ASHA state restored, no secrets written


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tiny_model, sms_subset, tmp_path, searches):
    s = Search(tmp_path, "resume", real_trial_sets(tiny_model, sms_subset, num_trials=3), secrets=True)
    searches.append(s)
    s.start()

    def one_done_one_midway():
        runs = s.children()
        done = [r for r in runs if r.info.status == "FINISHED"]
        midway = [r for r in runs if r.info.status == "RUNNING" and 3 in s.steps(r)]
        return (done, midway) if done and midway else None

    done, midway = s.wait_for(one_done_one_midway, 600, "one finished trial and one at its step-3 checkpoint")
    before = s.ray_processes()
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(30)
    time.sleep(2)
    survivors = alive(before)  # Ray's agents outlive a killed driver; the resumed driver must end them

    assert s.run("--resume", timeout=900) == 0, s.output()[-3000:]
    assert alive(survivors) == [] and s.ray_processes() == []
    assert "left running by an earlier, killed driver" in s.output() or not survivors

    summary = s.summary()
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" and t["value"] is not None for t in trials.values())
    assert summary["best"]["test_f1"] is not None

    runs = s.children()
    c = s.client()
    parents = c.search_runs([runs[0].info.experiment_id], "tags.`qlora.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {r.data.tags["qlora.trial_id"]: r for r in runs}
    assert sorted(by_trial) == sorted(trials) and len(runs) == 3  # one child per trial, none duplicated
    for tid, run in by_trial.items():
        assert run.info.status == "FINISHED"
        assert s.steps(run) == [3, 6], (tid, s.steps(run))  # not re-run, and the cut trial went on from step 3
        # a trial's value is its best evaluation (whose checkpoint it exports), across the kill as well
        history = [m.value for m in c.get_metric_history(run.info.run_id, "val_f1")]
        assert trials[tid]["value"] == pytest.approx(max(history))
    assert midway[0].data.tags["qlora.trial_id"] in by_trial and done[0].data.tags["qlora.trial_id"] in by_trial

    tune_dir = s.runs / "resume" / "tune-resume"
    # the searcher came back from the experiment checkpoint: its Optuna study holds every trial with its final value
    state = pickle.loads(sorted(tune_dir.glob("searcher-state-*.pkl"))[-1].read_bytes())
    study = state["_ot_study"]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # (Optuna learns from each trial's last result, the run's latest val_f1, with ties ordered by eval loss: a nudge
    # below 1e-6, searcher.tie_break)
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(r.data.metrics["val_f1"] for r in runs),
                                                                  abs=1e-6)
    # ASHA's rungs came back too: the rung at step 6 holds the trial that finished before the kill
    cb_state = pickle.loads(sorted(tune_dir.glob("callback-states-*.pkl"))[-1].read_bytes())
    sched = next(v["scheduler"] for v in cb_state.values() if isinstance(v, dict) and "scheduler" in v)
    recorded = {tid for _, rec in sched["_brackets"][0]._rungs for tid in rec}
    assert recorded == set(trials)

    # secrets from the environment appear nowhere in what the search wrote (MLflow store, artifacts, Ray results)
    assert_no_secrets(tmp_path, c, runs + parents)
    # checkpoints and adapters: weights in safetensors; the optimizer state loads with weights_only=True
    assert_safe_checkpoints(s.runs / "resume")


def assert_no_secrets(root: Path, client, runs) -> None:
    values = [v.encode() for v in SECRETS.values()]
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            assert not any(v in data for v in values), f"a secret leaked into {path}"
    assert scanned > 50
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags])
        assert not any(v.decode() in text for v in values)


def assert_safe_checkpoints(search_dir: Path) -> None:
    import torch

    ckpts = [p for p in (search_dir / "train").rglob("checkpoint_*") if p.is_dir()]
    assert ckpts
    for ck in ckpts + [search_dir / "best_adapter"]:
        names = {p.name for p in ck.iterdir()}
        assert "adapter_model.safetensors" in names, ck
        assert not any(n.endswith((".bin", ".pkl", ".pickle", ".pth")) for n in names), names
        for pt in ck.glob("*.pt"):
            torch.load(pt, weights_only=True)  # plain tensors and numbers only


# ---------------------------------------------------------------------------------------------------------------
# Train workers killed: retried from the last checkpoint in the same MLflow run, or failed visibly; memory flat


def test_killed_train_worker_retries_then_fails_visibly_and_memory_stays_flat(tiny_model, sms_subset, tmp_path,
                                                                            searches):
    s = Search(tmp_path, "faults", real_trial_sets(tiny_model, sms_subset, num_trials=3, max_failures=1))
    searches.append(s)
    s.start()
    driver = s.proc.pid
    killed: dict[str, list[int]] = {}
    workers_seen: dict[str, set[int]] = {}
    rss_after: list[dict[int, int]] = []

    def running_trial():
        runs = [r for r in s.children() if r.info.status == "RUNNING"]
        return runs[0] if runs else None

    def kill_worker(tid, avoid=()):
        def fresh():
            return [p for p in train_workers(driver) if p.pid not in avoid]
        w = s.wait_for(fresh, 300, f"a Train worker of trial {tid}", poll=0.2)[0]
        w.kill()
        killed.setdefault(tid, []).append(w.pid)
        return w.pid

    def finished(n):
        return lambda: len([r for r in s.children() if r.info.status in ("FINISHED", "FAILED")]) >= n

    # trial 1: killed once after its step-3 checkpoint -> retried from it
    first = s.wait_for(lambda: (r := running_trial()) and 3 in s.steps(r) and r, 600, "trial 1 at step 3")
    t1 = first.data.tags["qlora.trial_id"]
    workers_seen[t1] = {p.pid for p in train_workers(driver)}
    kill_worker(t1)
    s.wait_for(finished(1), 600, "trial 1 to finish after its retry")
    rss_after.append(tree_rss(driver))
    # trial 2 runs undisturbed
    second = s.wait_for(lambda: (r := running_trial()) and r.data.tags["qlora.trial_id"] != t1 and r, 600,
                        "trial 2 to start")
    t2 = second.data.tags["qlora.trial_id"]
    workers_seen[t2] = {p.pid for p in s.wait_for(lambda: train_workers(driver), 300, "trial 2's worker")}
    s.wait_for(finished(2), 600, "trial 2 to finish")
    rss_after.append(tree_rss(driver))
    # trial 3: its worker killed twice -> max_failures=1 exhausted -> the trial fails
    third = s.wait_for(lambda: (r := running_trial()) and r.data.tags["qlora.trial_id"] not in (t1, t2) and r, 600,
                       "trial 3 to start")
    t3 = third.data.tags["qlora.trial_id"]
    first_kill = kill_worker(t3)
    kill_worker(t3, avoid={first_kill})
    assert s.proc.wait(600) == 0, s.output()[-3000:]
    assert s.ray_processes() == []

    runs = {r.data.tags["qlora.trial_id"]: r for r in s.children()}
    summary = {t["trial_id"]: t for t in s.summary()["trials"]}
    # retried trial: same child run, history continues (step 3 once: resumed from the checkpoint, not restarted)
    assert runs[t1].info.status == "FINISHED" and s.steps(runs[t1]) == [3, 6]
    assert summary[t1]["status"] == "TERMINATED" and summary[t1]["value"] is not None
    # the trial that kept failing: FAILED with its error, never scored as 0
    assert runs[t3].info.status == "FAILED" and runs[t3].data.tags.get("qlora.error")
    assert summary[t3]["status"] == "ERROR" and summary[t3]["value"] is None and summary[t3]["error"]
    assert s.summary()["best"]["trial_id"] in (t1, t2)
    assert len(runs) == 3

    # memory: each trial's Train worker process is gone when the trial ended; nothing accumulates
    for tid in (t1, t2):
        assert alive([psutil.Process(p) for p in workers_seen[tid] if psutil.pid_exists(p)]) == []
    # the processes that live through the whole search (driver, raylet, GCS, dashboard, and the warm host that
    # trained the trials, trainables/warm.py) do not grow: a trial leaves nothing behind in them. Per-trial processes
    # (the next trial may be starting at a sample, in a pool worker that was idle at the one before) are compared
    # only by being gone, above.
    lasting = set(rss_after[0]) & set(rss_after[1])
    before, after = (sum(r[p] for p in lasting) for r in rss_after)
    assert after <= before + 300 * 2**20, (before / 2**20, after / 2**20)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM: stop, summary of what finished, MLflow statuses, no Ray process left; a second signal exits at once


def test_sigterm_stops_cleanly_and_leaves_no_ray_process(tiny_model, sms_subset, tmp_path, searches):
    s = Search(tmp_path, "term", standin_sets(tiny_model, sms_subset, num_trials=10, max_concurrent_trials=2, **{
        "trial.optim.max_steps": 300, "trial.eval.every_steps": 100}))
    searches.append(s)
    s.start()
    def two_done_one_running():
        status = [r.info.status for r in s.children()]
        return status.count("FINISHED") >= 2 and "RUNNING" in status

    s.wait_for(two_done_one_running, 300, "two trials done and one running", poll=0.2)
    listening = loopback_check(s.proc.pid)
    os.kill(s.proc.pid, signal.SIGTERM)
    assert s.proc.wait(120) == 130, s.output()[-3000:]
    time.sleep(1)
    assert s.ray_processes() == []  # orphans after SIGTERM: 0

    summary = s.summary()
    assert summary["interrupted"] == "SIGTERM"
    finished = [t for t in summary["trials"] if t["status"] == "TERMINATED"]
    assert len(finished) >= 2 and all(t["value"] is not None for t in finished)
    assert any(t["status"] == "INTERRUPTED" for t in summary["trials"])
    runs = s.children()
    status = {r.data.tags["qlora.trial_id"]: r.info.status for r in runs}
    assert all(status[t["trial_id"]] == "FINISHED" for t in finished)
    assert "RUNNING" not in status.values() and "KILLED" in status.values()
    c = s.client()
    parent = c.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "KILLED"
    assert listening["dashboard"] and all(ip in ("127.0.0.1", "::1") for ip in listening["dashboard"])

    # the stopped search continues with --resume and ends complete
    assert s.run("--resume", timeout=600) == 0, s.output()[-3000:]
    summary = s.summary()
    assert len(summary["trials"]) == 10 and all(t["status"] == "TERMINATED" for t in summary["trials"])
    assert len(s.children()) == 10 and s.ray_processes() == []


def test_second_signal_exits_at_once(tiny_model, sms_subset, tmp_path, searches):
    s = Search(tmp_path, "twice", standin_sets(tiny_model, sms_subset, num_trials=40, max_concurrent_trials=2, **{
        "trial.optim.max_steps": 3000, "trial.eval.every_steps": 1000}))
    searches.append(s)
    s.start()
    s.wait_for(lambda: any(r.info.status == "RUNNING" for r in s.children()), 300, "a running trial")
    os.kill(s.proc.pid, signal.SIGINT)
    time.sleep(0.3)
    t = time.time()
    os.kill(s.proc.pid, signal.SIGINT)
    assert s.proc.wait(30) == 130
    assert time.time() - t < 10, time.time() - t
    time.sleep(1)
    assert s.ray_processes() == []


def test_two_searches_started_together_on_one_ray_cluster_each_keep_their_own_trials(tiny_model, sms_subset,
                                                                                      tmp_path):
    """Ray stages a Tune driver's experiment state (its trials, searcher and callbacks) under <Ray session>/artifacts/
    <the second its storage was set up>/<experiment name> and copies that directory to the search's storage. When
    every search's experiment was named "tune", two searches that started on one cluster within the same second
    shared it, and one read the other's trials back from its own storage (bench/README.md). Each search now stages
    under its own name, and its storage holds exactly its own trials. Real local Ray, two `search.run` processes
    joining it at once (`ray_address`), the fast stand-in trainable."""
    import ray

    from search.driver import start_local_ray
    from search.report import trial_histories

    start_local_ray(2)
    try:
        address = ray.get_runtime_context().gcs_address
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        pair = []
        for name in ("one", "two"):  # each its own MLflow store: one sqlite file for both would serialize them
            (tmp_path / name).mkdir()
            pair.append(Search(tmp_path / name, name, standin_sets(
                tiny_model, sms_subset, num_trials=3, max_concurrent_trials=1, ray_address=address,
                **{"trial.optim.max_steps": 20, "trial.eval.every_steps": 10})))
        for s in pair:
            s.start()
        for s in pair:
            assert s.proc.wait(600) == 0, s.output()[-3000:]
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    for s in pair:
        summary = s.summary()
        ids = {t["trial_id"] for t in summary["trials"]}
        assert len(ids) == 3
        assert set(trial_histories(s.runs / s.name, summary["objective"]["metric"])) == ids
        assert (s.runs / s.name / f"tune-{s.name}").is_dir()
    assert sorted(p.name for p in session.glob("artifacts/*/tune*")) == ["tune-one", "tune-two"]


def loopback_check(driver_pid: int) -> dict:
    """Listening addresses of the HTTP server the project starts and configures: Ray's dashboard, on the port the
    driver chose for it (its `--port=` argument; a retry may take the next ports)."""
    out = {"dashboard": []}
    for p in [psutil.Process(driver_pid)] + psutil.Process(driver_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if "dashboard/dashboard.py" in " ".join(cmd):
                port = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--port=")))
                out["dashboard"] += [c.laddr.ip for c in p.net_connections("inet")
                                     if c.status == psutil.CONN_LISTEN and port <= c.laddr.port <= port + 50]
        except psutil.Error:
            continue
    return out


# ---------------------------------------------------------------------------------------------------------------
# load: 200 trials through the real driver, scheduler and MLflow path with the fast stand-in trainable


def test_200_trials_all_recorded(tiny_model, sms_subset, tmp_path, searches):
    from trainables.standin import SECONDS_PER_STEP

    n, steps, every = 200, 4, 2
    s = Search(tmp_path, "load", standin_sets(tiny_model, sms_subset, num_trials=n, max_concurrent_trials=2, **{
        "trial.optim.max_steps": steps, "trial.eval.every_steps": every, "scheduler.type": "asha"}))
    searches.append(s)
    t0 = time.time()
    assert s.run(timeout=1200) == 0, s.output()[-3000:]
    wall = time.time() - t0
    summary = s.summary()
    assert len(summary["trials"]) == n and all(t["status"] == "TERMINATED" for t in summary["trials"])
    assert all(t["value"] is not None for t in summary["trials"])
    runs = s.children()
    assert len(runs) == n and len({r.data.tags["qlora.trial_id"] for r in runs}) == n
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["qlora.trial_id"] for r in runs} == {t["trial_id"] for t in summary["trials"]}
    work = sum(t["steps"] for t in summary["trials"]) * SECONDS_PER_STEP
    overhead = (summary["wall_seconds"] - work) / n
    print(f"\nload: {n} trials in {wall:.1f} s (driver wall {summary['wall_seconds']} s, stand-in work {work:.1f} s, "
          f"MLflow {summary['mlflow_seconds']} s): {overhead:.3f} s bookkeeping per trial")
    (tmp_path / "load.json").write_text(json.dumps({"trials": n, "wall": wall, "overhead_per_trial": overhead}))
    assert overhead < 5.0
