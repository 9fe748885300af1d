#!/bin/bash
# Alternating rounds: for each policy, start the idle Ray, time steps.py twice beside it, stop it. From the repo root.
D=bench/results/2026-12-05-sched-batch
for round in 1 2 3; do
  for mode in none batch idle; do
    python $D/idle_ray_policy.py $mode > $D/ray_$mode.log 2>&1 &
    RP=$!
    for i in $(seq 60); do grep -q ready $D/ray_$mode.log && break; sleep 1; done
    sleep 3
    for k in 1 2; do echo "round $round $mode $(python bench/results/2026-12-04-idle-ray-probes/steps.py main 2>/dev/null)"; done
    kill $RP; wait $RP 2>/dev/null; ray stop --force >/dev/null 2>&1; sleep 2
  done
  echo "round $round noray $(python bench/results/2026-12-04-idle-ray-probes/steps.py main 2>/dev/null)"
done
