#!/usr/bin/env bash
# The GPU checks of bench/README.md's third H200 run, in one run: 383 s on an NVIDIA H200 (the whole Qwen3-0.6B
# shape). Each step writes its own report as it goes, so a run cut short keeps the steps it finished.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# 1. order/       the 4-bit and bf16 pairs at batch 16 in two rounds, the second in reverse order: is the search
#                 loop's 4-bit gap at batch 16 the order the configurations ran in, or the loop?
# 2. concurrent4/ four copies of the search's 4-bit loop at once: how many trials one GPU should hold.
# 3. gc/          the search's 4-bit loop with gradient checkpointing (the GPU configs turned it off).
# 4. concurrent2/ two copies at once.
#
# Packages the machine lacks travel as wheels in .whl/ (bench/README.md, "How it was run"); they are installed to a
# scratch directory first (WHEELS=0 skips that). SHAPE, LAYERS and STEPS override the model and the timed steps (a
# quick rehearsal on a CPU: WHEELS=0 SHAPE=tiny LAYERS=3 STEPS=2).
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
shape=${SHAPE:-qwen3-0.6b} layers=${LAYERS:-28} steps=${STEPS:-20}
mkdir -p "$out"
if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qlora-site \
    .whl/*.whl > "$out/pip.log" 2>&1 || { echo "installing .whl/ failed: $out/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/qlora-site:.
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c "import torch, transformers, peft, trl, bitsandbytes, datasets as d; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes',
bitsandbytes.__version__, 'datasets', d.__version__)" 2>&1; } > "$out/env.txt"

run() {  # name, then bench.throughput's options
  local name=$1; shift
  echo "[$(date +%H:%M:%S)] $name"
  python3 -m bench.throughput --shape "$shape" --layers "$layers" --steps "$steps" "$@" --out "$out/$name" \
    > "$out/$name.log" 2>&1
  echo "  exit $?; $(grep -c '^| search\|^| bare' "$out/$name/throughput.md" 2>/dev/null || echo 0) rows"
}
run order --rounds 2 --config-timeout 90 \
  --only search:4bit:padded bare:4bit:padded search:none:padded bare:none:padded
run concurrent4 --concurrent 4 --config-timeout 150 --only search:4bit:padded
run gc --gradient-checkpointing --config-timeout 90 --only search:4bit:padded
run concurrent2 --concurrent 2 --config-timeout 120 --only search:4bit:padded
for name in order concurrent4 gc concurrent2; do
  [ -f "$out/$name/throughput.md" ] && cat "$out/$name/throughput.md"
done
