"""Searches on a multi-node Ray cluster.

- cluster.yaml passes Ray's own cluster-launcher config validation (the code `ray up` runs before it touches AWS).
- A real autoscaling Ray cluster on this machine, made from cluster.yaml with Ray's fake_multinode provider (see
  tests/fake_cluster.py): a head node, and worker nodes of cluster.yaml's `gpu_a10g` type that the autoscaler adds
  when trials ask for their stand-in GPU resource `accel_a10g`. A small search runs on it against a real
  `mlflow server` over HTTP on loopback, with trial results in a shared directory; its trials must run on different
  autoscaler-added worker nodes, and MLflow must hold every run, metric and adapter afterwards.
- Multi-node setups with node-local storage, a file/sqlite MLflow store or the driver-built tiny model are refused
  before anything is trained, built or logged.

Stood in for: AWS (the fake provider launches local raylets instead of EC2 instances) and the GPU (a custom
resource); the CPU counts of the instance types are scaled down to this 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fake_cluster import FakeCluster, free_port

ROOT = Path(__file__).resolve().parent.parent


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


# ---------------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_yaml()
    cfg = prepare_config(raw)  # what `ray up` does first: merge Ray's AWS defaults, fill min/max workers
    validate_config(cfg)  # Ray's JSON schema (ray-schema.json) and its cross-field checks

    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not any(k.startswith("accel_") for k in head["resources"])  # trials' workers never land on the head
    gpu = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert gpu["gpu_a10g"]["node_config"]["InstanceType"] == "g5.xlarge"
    assert len(gpu) >= 2 and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu.values())  # autoscaling
    assert all(any(k.startswith("accel_") for k in t["resources"]) for t in gpu.values())
    assert sum(t["max_workers"] for t in gpu.values()) >= cfg["max_workers"] > 0

    setup = " ".join(cfg["setup_commands"])
    assert "-e ~/qlora-search" in setup and cfg["file_mounts"]["~/qlora-search"] == "."
    assert "MLFLOW_TRACKING_URI=http://" in setup and "QLORA_STORAGE_PATH=" in setup
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host $(hostname -I" in mlflow and "0.0.0.0" not in mlflow  # the head's private address only
    assert "--artifacts-destination $QLORA_STORAGE" in mlflow and "--backend-store-uri sqlite:///" in mlflow
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|secret_access|password|BEGIN .*PRIVATE KEY", text, re.I)


def test_rays_validation_rejects_a_broken_cluster_yaml():
    """The validation above is real: Ray rejects an unknown field and a head type that is not defined."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster_yaml()
    bad["avaliable_node_types"] = bad.pop("available_node_types")
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        validate_config(prepare_config(bad))
    bad = _cluster_yaml()
    bad["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


# ------------------------------------------------------------------------------ storage and tracking helpers


def test_storage_and_tracking_classification(tmp_path):
    from search import cluster
    from search.config import load_config
    from trainables.ray_trainable import checkpoint_uri

    local = load_config(None, [f"output_dir={tmp_path}"], "s")
    assert cluster.storage_root(local) == f"{tmp_path.resolve()}/s" and not cluster.storage_is_shared(local)
    s3 = load_config(None, ["storage_path=s3://bucket/prefix/"], "s")
    assert cluster.storage_root(s3) == "s3://bucket/prefix/s" and cluster.storage_is_shared(s3)
    nfs = load_config(None, [f"storage_path={tmp_path}/nfs", "storage_shared=true"], "s")
    assert cluster.storage_root(nfs) == f"{tmp_path.resolve()}/nfs/s" and cluster.storage_is_shared(nfs)
    assert [cluster.tracking_is_local(u) for u in ("sqlite:///m.db", "file:///x/mlruns", "mlruns",
            "http://10.0.0.5:5000", "https://mlflow.example", "databricks")] == [True, True, True, False, False, False]
    # Train reports checkpoint paths without the scheme; the driver gets a URI it can open from any node
    assert checkpoint_uri("s3://bucket/runs/s/train", "bucket/runs/s/train/t/checkpoint_0") == \
        "s3://bucket/runs/s/train/t/checkpoint_0"
    assert checkpoint_uri(str(tmp_path), f"{tmp_path}/c") == f"{tmp_path}/c"


def test_multi_node_rules_without_a_cluster(tmp_path):
    """check_cluster's decisions, given what the probe saw (the cluster tests below see it for real)."""
    from search.cluster import check_cluster
    from search.config import load_config
    from trainables.settings import SettingsError

    ok = [f"output_dir={tmp_path}", f"storage_path={tmp_path}/shared", "storage_shared=true",
          "mlflow.tracking_uri=http://127.0.0.1:5000", f"trial.model.name_or_path={tmp_path}"]
    check_cluster(load_config(None, ok), 1, True, "a:1")  # one node that runs the trials: anything goes
    check_cluster(load_config(None, [f"output_dir={tmp_path}"]), 1, True, "a:1")
    check_cluster(load_config(None, ok), 3, True, "a:1")
    with pytest.raises(SettingsError, match=r"^storage_path: .* has 3 nodes; set storage_path=s3://"):
        check_cluster(load_config(None, ok[:1] + ok[3:]), 3, True, "a:1")
    with pytest.raises(SettingsError, match=r"^mlflow.tracking_uri: sqlite:///m.db .* does not fit on the driver"):
        check_cluster(load_config(None, ok[:3] + ["mlflow.tracking_uri=sqlite:///m.db"] + ok[4:]), 1, False, "a:1")
    with pytest.raises(SettingsError, match=r"^trial.model.name_or_path: the built-in tiny model"):
        check_cluster(load_config(None, ok[:4]), 2, True, "a:1")


def test_storage_path_is_checked_before_ray_starts(tiny_model, sms_subset, tmp_path, capsys):
    """An unknown URI scheme, and an existing search in shared storage, are refused by the preflight."""
    from search.run import main

    base = ["--name", "st", "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"trial.data.path={sms_subset}",
            "--set", f"trial.model.name_or_path={tiny_model}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    assert main(base + ["--set", "storage_path=s3q://bucket/x", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: storage_path: s3q://bucket/x cannot be opened")
    (tmp_path / "shared" / "st" / "tune").mkdir(parents=True)
    assert main(base + ["--set", f"storage_path={tmp_path / 'shared'}", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'shared' / 'st'} already holds a search")
    assert main(base + ["--set", f"storage_path={tmp_path / 'shared'}", "--resume", "--dry-run"]) == 0


# ------------------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    c = FakeCluster(tmp_path_factory.mktemp("cl"), head_cpus=1, idle_timeout_minutes=2.0).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start: " + (d / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield uri, d
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
    log.close()


def _argv(cluster: FakeCluster, work: Path, name: str, *sets: str) -> list[str]:
    out = ["--name", name, "--set", f"ray_address={cluster.address}", "--set", f"output_dir={work / 'runs'}",
           "--set", f"space={ROOT / 'spaces' / 'classification.yaml'}"]
    for s in sets:
        out += ["--set", s]
    return out


_MAIN_RUNNER = """
import contextlib, io, json, sys
from search.run import main
out = []
for argv in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(argv)
    out.append({"rc": rc, "stderr": err.getvalue(), "stdout": std.getvalue()})
print("RESULTS " + json.dumps(out))
"""


def _run_main(*argvs: list[str]) -> list[dict]:
    """search.run's main() for each argv, in one fresh process with the cluster's token mode (as a user's shell
    on the cluster has it: cluster.yaml exports RAY_AUTH_MODE=token); one process saves the imports per call."""
    proc = subprocess.run([sys.executable, "-c", _MAIN_RUNNER, json.dumps(list(argvs))], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert proc.returncode == 0 and "RESULTS " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS ", 1)[1])


def _refusal(result: dict) -> str:
    """Exit status 2 and one `error:` line on stderr; returns the message."""
    err = result["stderr"].strip()
    assert result["rc"] == 2 and err.count("\n") == 0 and err.startswith("error: "), result
    return err[len("error: "):]


@pytest.mark.slow
def test_refused_before_anything_starts_and_dry_run_reports_the_cluster(fake_cluster, mlflow_server, tiny_model,
                                                                        sms_subset, tmp_path):
    """Only the head is up, and it cannot run a trial (no accel_a10g): the trials' workers will run on nodes the
    autoscaler adds, so the search is multi-node although one node is alive. Refused before anything is built,
    trained or logged; with shared storage and the tracking server, --dry-run passes and shows the cluster."""
    uri, _ = mlflow_server
    trial = ["resources.custom_per_worker={accel_a10g: 1}", f"trial.data.path={sms_subset}"]
    model = [f"trial.model.name_or_path={tiny_model}"]
    shared = [f"storage_path={tmp_path / 'shared'}", "storage_shared=true"]
    local_storage, sqlite, tiny, dry = _run_main(
        _argv(fake_cluster, tmp_path, "refused", *trial, *model, f"mlflow.tracking_uri={uri}"),
        _argv(fake_cluster, tmp_path, "refused", *trial, *model, *shared,
              f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"),
        _argv(fake_cluster, tmp_path, "refused", *trial, *shared, f"mlflow.tracking_uri={uri}"),
        _argv(fake_cluster, tmp_path, "dry", *trial, *model, *shared, f"mlflow.tracking_uri={uri}") + ["--dry-run"],
    )
    msg = _refusal(local_storage)
    assert msg.startswith(f"storage_path: {tmp_path / 'runs'} is local to each node, but a trial") and \
        "does not fit on the driver's node" in msg and "set storage_path=s3://BUCKET/PREFIX" in msg and \
        "storage_shared=true" in msg, msg
    msg = _refusal(sqlite)
    assert msg.startswith(f"mlflow.tracking_uri: sqlite:///{tmp_path / 'm.db'} is a store on one node") and \
        "set mlflow.tracking_uri=http://" in msg, msg
    msg = _refusal(tiny)
    assert msg.startswith("trial.model.name_or_path: the built-in tiny model is built on the driver's node"), msg
    # nothing was started: no search directory, no sqlite store, no MLflow run on the server
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists() and not (tmp_path / "shared").exists()
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("qlora-search")
    assert exp is None or not MlflowClient(uri).search_runs([exp.experiment_id], "tags.`qlora.search` = 'refused'")
    assert dry["rc"] == 0, dry
    assert re.search(r"cluster: 1 node\(s\) alive with \{'CPU': 1\.0", dry["stdout"]), dry["stdout"]
    assert f"{tmp_path / 'shared'}/dry" in dry["stdout"]


@pytest.fixture(scope="module")
def cluster_search(fake_cluster, mlflow_server, tiny_model, sms_subset, tmp_path_factory):
    """Two trials at once, each asking for one accel_a10g: the autoscaler must add two gpu_a10g nodes."""
    uri, _ = mlflow_server
    work = tmp_path_factory.mktemp("search")
    argv = [sys.executable, "-m", "search.run"] + _argv(
        fake_cluster, work, "multi", f"mlflow.tracking_uri={uri}", f"storage_path={work / 'shared'}",
        "storage_shared=true", f"trial.model.name_or_path={tiny_model}", f"trial.data.path={sms_subset}",
        "resources.custom_per_worker={accel_a10g: 1}", "resources.cpus_per_worker=1",
        "num_trials=2", "max_concurrent_trials=2", "trial.optim.max_steps=6", "trial.optim.batch_size=8",
        "trial.eval.every_steps=3", "trial.eval.max_examples=24", "trial.data.max_length=96",
        "scheduler.grace_period=2")
    t0 = time.time()
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "RAY_AUTH_MODE": "token"})
    except subprocess.TimeoutExpired as e:  # say where the search stood, and what the autoscaler last saw
        out, err = (s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (e.stdout, e.stderr))
        monitor = fake_cluster.monitor_log()
        tail = monitor.read_text(errors="replace")[-2500:] if monitor.is_file() else "(no monitor.log)"
        pytest.fail(f"search still running after 900 s\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n"
                    f"{err[-2000:]}\n--- autoscaler monitor.log ---\n{tail}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "uri": uri, "stdout": proc.stdout, "seconds": time.time() - t0}


def _trial_results(shared: Path) -> dict[str, list[dict]]:
    """Every result each trial reported, read from the shared storage directory (Tune's result.json files)."""
    out = {}
    for f in shared.glob("multi/tune-multi/*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


@pytest.mark.slow
def test_trials_ran_on_different_autoscaled_worker_nodes(cluster_search, fake_cluster):
    work = cluster_search["work"]
    summary = json.loads((work / "runs" / "multi" / "summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    results = _trial_results(work / "shared")
    assert sorted(results) == sorted(t["trial_id"] for t in summary["trials"])
    nodes = {tid: {r["node_id"] for r in rows} for tid, rows in results.items()}
    assert all(len(n) == 1 for n in nodes.values())  # each trial's worker stayed on its node
    used = [n.pop() for n in nodes.values()]
    assert len(set(used)) == 2, nodes  # two trials, two different nodes
    # fake-provider node ids: ...00000 is the head; ...00001 onwards are workers the autoscaler launched
    assert all(re.fullmatch(r"f+0*[1-9]\d*", n) for n in used), used
    assert fake_cluster.added_nodes().count("gpu_a10g") >= 2
    # checkpoints were written to the shared directory, not to node-local trial directories
    ckpts = list((work / "shared" / "multi" / "train").glob("train-*/checkpoint_*/adapter_model.safetensors"))
    assert len(ckpts) >= 2
    assert not (work / "runs" / "multi" / "tune-multi").exists()


@pytest.mark.slow
def test_mlflow_server_holds_every_run_metric_and_adapter(cluster_search, mlflow_server):
    from mlflow.tracking import MlflowClient

    uri, store = mlflow_server
    work = cluster_search["work"]
    summary = json.loads((work / "runs" / "multi" / "summary.json").read_text())
    assert summary["mlflow"]["tracking_uri"] == uri
    c = MlflowClient(uri)
    runs = c.search_runs([summary["mlflow"]["experiment_id"]], "tags.`qlora.search` = 'multi'")
    parent = [r for r in runs if r.data.tags.get("qlora.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow"]["parent_run_id"]]
    assert len(parent) == 1 and len(children) == 2 and parent[0].info.status == "FINISHED"
    assert {r.data.tags["qlora.trial_id"] for r in children} == {t["trial_id"] for t in summary["trials"]}
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(child.info.run_id, "val_f1")] == [3, 6]
        assert {"eval_loss", "val_bal_f1", "world_size"} <= child.data.metrics.keys()
        files = {a.path for a in c.list_artifacts(child.info.run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
    # the artifacts went through the server's proxy into its artifact store
    assert len(list((store / "artifacts").rglob("adapter_model.safetensors"))) == 2
    best = summary["best"]
    assert best["mlflow_run_id"] in {r.info.run_id for r in children} and "test_f1" in best
    assert c.get_model_version_by_alias("qlora-search-multi", "champion").run_id == best["mlflow_run_id"]


@pytest.mark.slow
def test_refused_with_several_nodes_alive(cluster_search, fake_cluster, tiny_model, sms_subset, tmp_path):
    """After the search its worker nodes are still up (idle timeout): now a trial that would fit the head is refused
    too, because the cluster has several nodes and Ray may place it on any of them."""
    [result] = _run_main(_argv(fake_cluster, tmp_path, "refused2", f"trial.model.name_or_path={tiny_model}",
                               f"trial.data.path={sms_subset}", f"mlflow.tracking_uri={cluster_search['uri']}"))
    msg = _refusal(result)
    assert re.match(r"storage_path: .* is local to each node, but the Ray cluster at \S+ has [3-9] nodes; set "
                    r"storage_path=s3://", msg), msg


_DDP_RUNNER = """
import json, os, sys
import ray, ray.train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    from trainables.model import device_map
    from trainables.settings import TrialSettings
    from trainables.sft import train

    import torch
    from unittest import mock

    rank = ray.train.get_context().get_world_rank()
    with mock.patch.object(torch.cuda, "is_available", return_value=True):  # the GPU is stood in for this call only
        on_gpu = device_map()
    seen = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "device_map": str(device_map()),
            "gpu_device_map": on_gpu, "node_id": ray.get_runtime_context().get_node_id(), "reports": 0,
            "checkpoints": 0}

    def report(metrics, checkpoint_dir):
        seen["reports"] += 1
        seen["checkpoints"] += checkpoint_dir is not None
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    train(TrialSettings.model_validate(config["settings"]), report)
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


ray.init(address=sys.argv[1], log_to_driver=False)
cfg = json.loads(sys.argv[2])
result = TorchTrainer(loop, train_loop_config=cfg,
                      scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "accel_a10g": 1}),
                      run_config=RunConfig(name="ddp", storage_path=cfg["storage"])).fit()
print("RESULT " + json.dumps({"error": str(result.error) if result.error else None,
                              "checkpoint": result.checkpoint.path if result.checkpoint else None}))
"""


@pytest.mark.slow
def test_a_ddp_trial_spans_two_nodes_and_only_rank_0_checkpoints(fake_cluster, fast_settings, tmp_path):
    """One trial, two Train workers (gloo DDP), each on its own gpu_a10g node: every rank loads its own base on the
    device of its local rank, all ranks report, and only rank 0 hands Train a checkpoint.

    Ray Train numbers local ranks per node *IP*; the fake nodes share this machine's IP, so the two ranks get local
    ranks 0 and 1 here (on a real cluster, 0 on each node). CPU training runs on "cpu"; what the same code picks on
    a GPU node is read with CUDA availability stood in."""
    s = fast_settings.with_values({"optim.max_steps": 3, "eval.every_steps": 3, "optim.batch_size": 4})
    cfg = {"settings": s.model_dump(), "out": str(tmp_path), "storage": str(tmp_path / "shared")}
    proc = subprocess.run([sys.executable, "-c", _DDP_RUNNER, fake_cluster.address, json.dumps(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert "RESULT " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["error"] is None and result["checkpoint"].startswith(str(tmp_path / "shared")), result
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
    assert sorted(r["local_rank"] for r in ranks) == [0, 1] and all(r["device_map"] == "{'': 'cpu'}" for r in ranks)
    assert all(r["gpu_device_map"] == {"": r["local_rank"]} for r in ranks)
    assert [r["reports"] for r in ranks] == [1, 1] and [r["checkpoints"] for r in ranks] == [1, 0]
    assert len(list((tmp_path / "shared" / "ddp").glob("checkpoint_*/adapter_model.safetensors"))) == 1
