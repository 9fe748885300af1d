"""A placement group that outlives its trial must not starve the test evaluation that follows the search."""

import threading
import time

import ray


def test_leftover_placement_groups_of_this_job_are_freed_after_fit(caplog):
    from ray.util import placement_group, placement_group_table, remove_placement_group

    from search.driver import release_leftover_placement_groups

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        leaked = placement_group([{"CPU": 1}])  # stands for the workers' group of a trial whose controller failed
        ended = placement_group([{"CPU": 1}])
        # stands for the workers' group of a trial stopped just before the end, which Ray Train's cleaner removes
        # a few seconds later (it checks every second): waited for, neither removed here nor counted
        late = placement_group([{"CPU": 1}])
        ray.get([leaked.ready(), ended.ready(), late.ready()])
        remove_placement_group(ended)  # already freed by Train: not counted again
        threading.Timer(1.5, remove_placement_group, args=(late,)).start()

        @ray.remote(num_cpus=3)
        def needs_every_cpu():
            return "ran"

        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="search.driver"):
            assert release_leftover_placement_groups(grace_s=4.0) == 1
        assert time.monotonic() - t0 >= 4.0  # the leak was given the whole grace
        assert "freed 1 placement group(s)" in caplog.text
        assert placement_group_table(leaked)["state"] == "REMOVED"
        assert ray.get(needs_every_cpu.remote(), timeout=60) == "ran"

        # nothing held after the grace: no wait beyond it, nothing removed, no warning
        caplog.clear()
        late = placement_group([{"CPU": 1}])
        ray.get(late.ready())
        threading.Timer(1.0, remove_placement_group, args=(late,)).start()
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="search.driver"):
            assert release_leftover_placement_groups(grace_s=30.0) == 0
        assert time.monotonic() - t0 < 10.0
        assert "freed" not in caplog.text
    finally:
        ray.shutdown()
