#!/bin/bash
# Training steps (steps.py, 150 steps) alone, then beside an idle local Ray with 10 idle actors: the system's TLB
# shootdowns and function-call interrupts per second over 5 s in the middle, and which processes' syscalls could
# cause them (perf). From the repository root; needs perf.
D=bench/results/2026-12-05-warm-trial-probes
tlb() { awk '/TLB shootdowns/ {print $2+$3}' /proc/interrupts; }
probe() {
  STEPS=150 python bench/results/2026-12-04-idle-ray-probes/steps.py main > $D/steps_$1.out 2>/dev/null &
  SP=$!; sleep 22
  a=$(tlb); perf record -q -o $D/perf_$1.data -e tlb:tlb_flush -e syscalls:sys_enter_munmap -e syscalls:sys_enter_madvise -e syscalls:sys_enter_mprotect -e syscalls:sys_enter_mmap -a -- sleep 5 2>/dev/null; b=$(tlb)
  echo "$1: TLB shootdowns/s $(( (b - a) / 5 ))"
  wait $SP; echo "$1: $(cat $D/steps_$1.out)"
}
probe alone
python bench/results/2026-12-05-sched-batch/idle_ray_policy.py none > $D/ray_none.log 2>&1 &
RP=$!
for i in $(seq 60); do grep -q ready $D/ray_none.log && break; sleep 1; done; sleep 3
probe idle_ray
kill $RP; wait $RP 2>/dev/null; ray stop --force >/dev/null 2>&1
