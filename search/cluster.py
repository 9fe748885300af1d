"""Searches on a multi-node Ray cluster: where trial results go, and the checks that refuse a setup that would lose them.

Since Ray 2.7, Tune and Train no longer copy trial directories to the head node: every node writes its trials'
checkpoints straight to the run's `storage_path`. On more than one node that path must be storage that all nodes
share (S3/GCS, or an NFS mount on every node); a local path leaves each checkpoint on the node that wrote it, where
the driver cannot test, register or export it. Likewise the MLflow store must be a server that every node and the
user can reach, not a file on whichever node the driver runs on.

`probe` connects to the cluster once, before the search starts (nothing is trained, built or logged yet), and raises
a one-line SettingsError naming the field to set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainables.settings import TINY_MODEL, SettingsError

# MLflow tracking URIs whose store lives on one machine's disk
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")


def is_uri(path: str | None) -> bool:
    """s3://, gs://, hdfs://, ... (a pyarrow filesystem URI); file:// and plain paths are local."""
    return bool(path) and "://" in path and not path.startswith("file://")


def storage_base(cfg) -> str:
    """The configured storage root: `storage_path`, else `output_dir` (a local path or a URI)."""
    base = cfg.storage_path or cfg.output_dir
    if base.startswith("file://"):
        base = base[len("file://"):]
    return base.rstrip("/") if is_uri(base) else str(Path(base).expanduser().resolve())


def storage_root(cfg) -> str:
    """Where Tune (`<root>/tune-<name>`, `tune_path`) and Train (`<root>/train`) write this search's trials:
    `<storage base>/<name>`."""
    return f"{storage_base(cfg)}/{cfg.name}"


def tune_name(cfg) -> str:
    """Tune's experiment name, which names its directory under `storage_root`: unique per search.

    Ray stages a Tune driver's experiment state (trials, searcher, callbacks) in `<Ray session>/artifacts/<the second
    its storage was set up>/<experiment name>/driver_artifacts` and copies that whole directory to storage. With one
    name for every search ("tune", until 2026-12-04), two searches that started on one Ray cluster within the same
    second shared the staging directory, and each copied the other's experiment state into its own storage, where
    reading or resuming it found the other search's trials (bench/README.md, "P2 with one TPE start-up trial, six
    seeds")."""
    return f"tune-{cfg.name}"


def tune_path(cfg) -> str:
    """This search's Tune experiment directory: `<root>/tune-<name>`, or `<root>/tune` for a search started before
    that name, so that it can still be resumed."""
    current, old = _tune_paths(cfg)
    return old if not _exists(current) and _exists(old) else current


def _tune_paths(cfg) -> tuple[str, str]:
    root = storage_root(cfg)
    return f"{root}/{tune_name(cfg)}", f"{root}/tune"


def storage_is_shared(cfg) -> bool:
    return is_uri(storage_base(cfg)) or cfg.storage_shared


def tracking_is_local(uri: str) -> bool:
    """sqlite:///x.db, file:///x, a plain path: a store on one node's disk. http(s), databricks, postgresql: remote."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("databricks", "databricks-uc"):
        return False
    return ":" not in uri or scheme in LOCAL_TRACKING_SCHEMES or len(scheme) == 1  # "C:\..." is a path


def search_exists(cfg) -> bool:
    """Whether this search's Tune experiment is already in storage (local or a URI), under either name."""
    return any(_exists(path) for path in _tune_paths(cfg))


def _exists(where: str) -> bool:
    if not is_uri(where):
        return Path(where).exists()
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(where)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except Exception as err:  # no credentials, no such bucket, unknown scheme
        raise SettingsError(f"storage_path: cannot read {where} ({err.__class__.__name__}: {str(err)[:200]}); "
                            f"check the URI and the machine's credentials (instance role or environment)") from None


def check_storage_path(cfg) -> None:
    """Checks that need no cluster: a URI's scheme must be one pyarrow knows."""
    base = cfg.storage_path
    if base and is_uri(base):
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(base)
        except Exception as err:
            raise SettingsError(f"storage_path: {base} cannot be opened ({err.__class__.__name__}: "
                                f"{str(err)[:200]}); use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a directory") from None


def per_trial_resources(cfg) -> dict[str, float]:
    r = cfg.resources
    out = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.gpus_per_worker:
        out["GPU"] = r.num_workers * r.gpus_per_worker
    out.update({k: r.num_workers * v for k, v in r.custom_per_worker.items()})
    return out


def check_cluster(cfg, alive_nodes: int, trial_fits_driver_node: bool, address: str) -> None:
    """Refuse a multi-node search whose trial results or tracking would stay on one node.

    Multi-node: more than one alive node, or a trial that does not fit on the driver's node (its workers will run on
    nodes the autoscaler adds, as on a cluster whose GPU workers start at zero)."""
    if alive_nodes <= 1 and trial_fits_driver_node:
        return
    why = (f"the Ray cluster at {address} has {alive_nodes} nodes" if alive_nodes > 1 else
           f"a trial ({per_trial_resources(cfg)}) does not fit on the driver's node of the Ray cluster at {address}, "
           f"so its workers run on other nodes")
    if not storage_is_shared(cfg):
        raise SettingsError(f"storage_path: {storage_base(cfg)} is local to each node, but {why}; set "
                            f"storage_path=s3://BUCKET/PREFIX (or gs://...), or a directory mounted on every node "
                            f"(NFS) together with storage_shared=true")
    uri = cfg.mlflow.tracking_uri
    if tracking_is_local(uri):
        raise SettingsError(f"mlflow.tracking_uri: {uri} is a store on one node's disk, but {why}; set "
                            f"mlflow.tracking_uri=http://HOST:5000 (an `mlflow server` all nodes reach), e.g. "
                            f"export MLFLOW_TRACKING_URI")
    if cfg.trial.model.name_or_path == TINY_MODEL:
        raise SettingsError(f"trial.model.name_or_path: the built-in tiny model is built on the driver's node only, "
                            f"but {why}; set it to a hub id (e.g. Qwen/Qwen3-0.6B) or a model directory every "
                            f"node has (python -m trainables.tiny --out SHARED_DIR)")


def probe(cfg) -> dict[str, Any]:
    """Connect to the cluster at `cfg.ray_address`, run `check_cluster`, disconnect. Returns what it saw."""
    import ray

    address = cfg.ray_address
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", configure_logging=False)
    except Exception as err:
        text = " ".join(str(e) for e in _chain(err))
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "auth" in type(err).__name__.lower():
            raise SettingsError(f"ray_address: the Ray cluster at {address} wants its token; export "
                                f"RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token "
                                f"(or RAY_AUTH_TOKEN)") from None
        raise SettingsError(f"ray_address: cannot connect to a Ray cluster at {address} "
                            f"({err.__class__.__name__}); start it (ray up / ray start) or fix the address") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        me = ray.get_runtime_context().get_node_id()
        mine = next((n for n in nodes if n["NodeID"] == me), {"Resources": {}})
        need = per_trial_resources(cfg)
        fits = all(mine["Resources"].get(k, 0.0) >= v for k, v in need.items() if v)
        total: dict[str, float] = {}
        for n in nodes:
            for k, v in n["Resources"].items():
                if not k.startswith("node:") and k not in ("memory", "object_store_memory"):
                    total[k] = total.get(k, 0.0) + v
    finally:
        ray.shutdown()
    check_cluster(cfg, len(nodes), fits, address)
    return {"nodes": len(nodes), "trial_fits_driver_node": fits, "resources": total}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
