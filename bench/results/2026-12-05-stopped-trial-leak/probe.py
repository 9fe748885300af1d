"""Does a Train run whose Tune trial is stopped leave its workers' placement group behind? (bench/README.md,
2026-12-05, "stop_with_trial")

Stands in for Tune stopping a trial, without Tune: an actor starts a Train run from a thread (as Tune's function
trainable does), and once the run's worker is busy it is told to exit (`__ray_terminate__`, as Tune ends a stopped
trial's actor). Ray then kills the actors it owned: the Train controller and, through it, the worker. The controller
polls its workers every 0.25 s, as in a search (search/driver.py).

Counted per repeat, from Ray's placement-group table:
- asked_after_stop: placement groups of this job created after the trial was told to exit (a restarted worker group);
- leaked: placement groups still CREATED 45 s after their trial was told to exit (Train's cleaner frees a dead
  controller's group within seconds; a leaked group stays until the job ends). They are removed once counted.
The Ray node has 8 logical CPUs so that leaked groups do not starve the next repeats while they wait to be counted.

    python bench/results/2026-12-05-stopped-trial-leak/probe.py REPEATS [--without-fix]
"""

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

LEAK_AFTER_S = 45.0


def _loop(config):
    (Path(config["dir"]) / "started").touch()
    end = time.time() + 600
    while time.time() < end:  # busy, as a training worker is
        sum(i * i for i in range(10000))


@ray.remote(num_cpus=0)
class Trial:
    def start(self, run_dir: str, fix: bool):
        from ray.train import FailureConfig, RunConfig, ScalingConfig

        from trainables.ray_trainable import TrialResources, stop_with_trial, trainer_class

        callbacks = [stop_with_trial(ray.get_runtime_context().get_actor_id())] if fix else []
        trainer = trainer_class(TrialResources())(
            _loop, train_loop_config={"dir": run_dir},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=Path(run_dir).name, storage_path=str(Path(run_dir).parent / "runs"),
                                 callbacks=callbacks, failure_config=FailureConfig(max_failures=2)))
        threading.Thread(target=trainer.fit, daemon=True).start()


def _groups(job: str) -> dict[str, tuple[float, str]]:
    """This job's placement groups: id -> (creation time, state)."""
    from ray.util.state import list_placement_groups

    return {g["placement_group_id"]: (int(g["stats"]["creation_request_received_ns"]) / 1e9, g["state"])
            for g in list_placement_groups(filters=[("creator_job_id", "=", job)], detail=True, limit=10000)}


def main() -> None:
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    from search.driver import start_local_ray

    repeats, fix = int(sys.argv[1]), "--without-fix" not in sys.argv
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_local_ray(8, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"})
    job = ray.get_runtime_context().get_job_id()
    stopped: dict[int, float] = {}  # repeat -> when its trial was told to exit
    rows: dict[int, dict] = {}
    seen: set[str] = set()

    def count_leaks(final: bool) -> None:
        groups = _groups(job)
        for i, at in stopped.items():
            if "leaked" in rows[i] or (time.time() - at < LEAK_AFTER_S and not final):
                continue
            mine = [g for g, (created, _) in groups.items() if g in rows[i]["groups"]]
            leaked = [g for g in mine if groups[g][1] == "CREATED"]
            for g in leaked:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g))))
            rows[i]["leaked"] = len(leaked)
            print(json.dumps({k: v for k, v in rows[i].items() if k != "groups"}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            run_dir = Path(tmp) / f"run-{i}"
            run_dir.mkdir()
            trial = Trial.remote()
            ray.get(trial.start.remote(str(run_dir), fix))
            while not (run_dir / "started").exists():
                time.sleep(0.1)
            time.sleep(1.0)
            stopped[i] = time.time()
            trial.__ray_terminate__.remote()
            del trial
            time.sleep(8.0)
            groups = _groups(job)
            new = [g for g in groups if g not in seen]
            seen.update(new)
            rows[i] = {"repeat": i, "groups": new,
                       "asked_after_stop": sum(groups[g][0] > stopped[i] for g in new)}
            count_leaks(final=False)
        time.sleep(max(0.0, LEAK_AFTER_S - (time.time() - stopped[repeats - 1])))
        count_leaks(final=True)
    ray.shutdown()
    print(json.dumps({"fix": fix, "repeats": repeats, "leaked": sum(r["leaked"] for r in rows.values()),
                      "asked_after_stop": sum(r["asked_after_stop"] for r in rows.values())}))


if __name__ == "__main__":
    main()
