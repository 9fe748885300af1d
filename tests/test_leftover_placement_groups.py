"""A placement group that outlives its trial must not starve the test evaluation that follows the search."""

import ray


def test_leftover_placement_groups_of_this_job_are_freed_after_fit():
    from ray.util import placement_group, remove_placement_group

    from search.driver import release_leftover_placement_groups

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        leaked = placement_group([{"CPU": 1}])  # stands for the workers' group of a trial whose controller failed
        ended = placement_group([{"CPU": 1}])
        ray.get([leaked.ready(), ended.ready()])
        remove_placement_group(ended)  # already freed by Train: not counted again

        @ray.remote(num_cpus=2)
        def needs_both_cpus():
            return "ran"

        assert release_leftover_placement_groups() == 1
        assert ray.get(needs_both_cpus.remote(), timeout=60) == "ran"
    finally:
        ray.shutdown()
