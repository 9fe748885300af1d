#!/bin/bash
# P1 at 300 steps; 5 s of perf (TLB flushes, memory-map syscalls, context switches) in the middle of each of the
# two trials' training, recognised as a WarmHost process above 150% CPU. From the repository root; needs perf.
D=bench/results/2026-12-05-warm-trial-probes
python -m bench.run --only p1 --p1-steps 300 --out $D/p1-300 > $D/p1-300.log 2>&1 &
BP=$!
host_busy() {  # pid of a WarmHost process using > 150% CPU over 2 s
  for p in $(pgrep -f '^ray::WarmHost'); do
    a=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null); sleep 2; b=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null)
    [ -n "$b" ] && [ $((b - a)) -gt 300 ] && echo $p && return
  done
}
for n in 1 2; do
  until [ -n "$(host_busy)" ]; do sleep 3; kill -0 $BP 2>/dev/null || exit 1; done
  sleep 15
  tlb1=$(awk '/TLB shootdowns/ {print $2+$3}' /proc/interrupts)
  perf record -q -o $D/perf_trial$n.data -e tlb:tlb_flush -e syscalls:sys_enter_munmap -e syscalls:sys_enter_madvise \
    -e syscalls:sys_enter_mprotect -e syscalls:sys_enter_mmap -e sched:sched_switch -a -- sleep 5 2>/dev/null
  tlb2=$(awk '/TLB shootdowns/ {print $2+$3}' /proc/interrupts)
  echo "trial $n: TLB shootdowns/s $(( (tlb2 - tlb1) / 5 ))"
  while [ -n "$(host_busy)" ]; do sleep 2; done
done
wait $BP
tail -3 $D/p1-300.log
