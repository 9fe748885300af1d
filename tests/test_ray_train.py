"""Ray Train around the SFT loop: two workers (gloo DDP on CPU) end with identical adapters; a single worker runs
without a torch process group unless asked for one."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _dump_adapters(config):
    """The real worker loop, plus a dump of this rank's trained adapter for the test to compare."""
    import ray.train
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from trainables.ray_trainable import train_worker

    rank = ray.train.get_context().get_world_rank()

    def dump(model):
        sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(sd, str(Path(config["out"]) / f"rank{rank}.safetensors"))

    train_worker(config, on_end=dump)


def test_two_workers_end_with_identical_adapters(fast_settings, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from safetensors.torch import load_file

    import sys

    from trainables.ray_trainable import TrialResources, trainer_class

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        s = fast_settings.with_values({"optim.batch_size": 4})
        trainer = trainer_class(TrialResources(num_workers=2))(
            train_loop_per_worker=_dump_adapters,
            train_loop_config={"settings": s.model_dump(), "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "storage")),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.error is None
    assert result.metrics["world_size"] == 2 and result.metrics["step"] == 6
    assert result.checkpoint is not None
    sa, sb = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    # lora_B starts at zero: nonzero B on both ranks means they trained, and stayed identical
    assert any(k.endswith("lora_B.weight") and sa[k].abs().sum() > 0 for k in sa)


def _process_group(config):
    import json

    import ray.train
    import torch.distributed as dist

    # Train V2's Result carries the metrics of the last checkpoint; this run has none, so it writes what it saw
    Path(config["out"]).write_text(json.dumps({"process_group": dist.is_available() and dist.is_initialized(),
                                               "world_size": ray.train.get_context().get_world_size()}))


def test_single_worker_runs_without_a_process_group_unless_asked(tmp_path):
    import json
    import sys

    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainables.ray_trainable import TrialResources, trainer_class

    assert issubclass(trainer_class(TrialResources(num_workers=2)), TorchTrainer)
    always = trainer_class(TrialResources(num_workers=1, torch_process_group="always"))
    assert issubclass(always, TorchTrainer)
    single = trainer_class(TrialResources(num_workers=1))
    assert not issubclass(single, TorchTrainer)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        seen = {}
        for name, cls in (("single", single), ("always", always)):
            out = tmp_path / f"{name}.json"
            result = cls(_process_group, train_loop_config={"out": str(out)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=name, storage_path=str(tmp_path))).fit()
            assert result.error is None
            seen[name] = json.loads(out.read_text())
    finally:
        ray.shutdown()
    assert seen["single"] == {"process_group": False, "world_size": 1}
    assert seen["always"] == {"process_group": True, "world_size": 1}


def test_a_run_without_ray_datasets_starts_no_dataset_manager(tmp_path):
    """Ray Train starts a DatasetManager actor (a process importing Ray Data) for every run; ours leave it out when
    there are no Ray Datasets, and still train and report. Ray's own trainer, same run, is the control."""
    import json
    import sys

    import ray
    import ray.cloudpickle
    from ray._private.state import actors
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from trainables.ray_trainable import TrialResources, trainer_class

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=1, include_dashboard=False)

    def managers() -> int:
        return sum(a["ActorClassName"].endswith("DatasetManager") for a in actors().values())

    try:
        started = {}
        for name, cls in (("ours", trainer_class(TrialResources(num_workers=1))), ("ray", DataParallelTrainer)):
            before = managers()
            out = tmp_path / f"{name}.json"
            result = cls(_process_group, train_loop_config={"out": str(out)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=name, storage_path=str(tmp_path))).fit()
            assert result.error is None and json.loads(out.read_text())["world_size"] == 1
            started[name] = managers() - before
    finally:
        ray.shutdown()
    assert started == {"ours": 0, "ray": 1}


def _die_at_first_start(config):
    """Train loop: records each worker start; the first worker dies while training, as a killed process does."""
    import os
    import time

    starts = Path(config["dir"])
    n = len(list(starts.glob("start-*")))
    (starts / f"start-{n}").touch()
    if n == 0:
        time.sleep(3)  # past the worker group's start
        os._exit(1)


def test_the_workers_of_a_dead_trial_are_not_restarted(tmp_path):
    """When Tune stops a trial, Ray kills the Train controller the trial actor owned; a controller that saw its
    workers die in that window restarted them, and the placement group it asked for outlived it (bench/README.md,
    2026-12-05, item 4). With the trial actor dead, `stop_with_trial` fails the run instead: one worker start, one
    placement group. With the trial actor alive, Train restarts the workers as `max_failures` allows (the control)."""
    import sys
    import time

    import ray
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.util import placement_group_table
    from ray.util.state import get_actor

    from search.driver import start_local_ray
    from trainables.ray_trainable import TrialGone, TrialResources, _error_chain, stop_with_trial, trainer_class

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_local_ray(2)

    @ray.remote(num_cpus=0)
    class Trial:  # stands for Tune's trial actor, which starts the Train run
        def actor_id(self):
            return ray.get_runtime_context().get_actor_id()

    def run(name: str, trial_actor_id: str):
        starts = tmp_path / name
        starts.mkdir()
        groups_before = len(placement_group_table())
        error = None
        try:
            trainer_class(TrialResources())(
                _die_at_first_start, train_loop_config={"dir": str(starts)},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=name, storage_path=str(tmp_path / "runs"),
                                     callbacks=[stop_with_trial(trial_actor_id)],
                                     failure_config=FailureConfig(max_failures=2))).fit()
        except Exception as e:  # Train raises the run's error from fit()
            error = e
        return len(list(starts.glob("start-*"))), len(placement_group_table()) - groups_before, error

    try:
        alive, dead = Trial.remote(), Trial.remote()
        alive_id, dead_id = ray.get([alive.actor_id.remote(), dead.actor_id.remote()])
        ray.kill(dead)
        deadline = time.time() + 60
        while (get_actor(dead_id) or {"state": "DEAD"})["state"] != "DEAD" and time.time() < deadline:
            time.sleep(0.5)

        starts, groups, error = run("alive", alive_id)
        assert (starts, groups, error) == (2, 2, None)  # restarted in a new placement group, then trained

        starts, groups, error = run("dead", dead_id)
        assert (starts, groups) == (1, 1)  # failed at the first worker death: no second group was asked for
        assert error is not None and any(isinstance(e, TrialGone) for e in _error_chain(error)), error
        leftover = [g for g in placement_group_table().values() if g.get("state") == "CREATED"]
        assert leftover == []
    finally:
        ray.shutdown()
