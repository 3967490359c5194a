#!/bin/bash
# The device check to run when a session has a GPU (about 15 minutes on one H100/H200):
# the paper-size step (ViT-B/14-reg @518 + BioMedLM-size decoder, bf16, remat) at two
# batch sizes, with samples/s, MFU and the peak memory of device 0, next to the memory
# that benchmarks/memory_plan.py computes for the same run.
#   bash benchmarks/gpu_check.sh            (PY=path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
$PY benchmarks/memory_plan.py --devices 1 --gpu-gb 80 --xla-check none
for batch in 16 48; do
  $PY benchmarks/train_step.py --batch "$batch" --steps 5
done
# The paper's batch of 144 by exact accumulation: micro-batches of 36 (k = 4) and 72 (k = 2),
# each against the one-pass step at 144 (samples/s, MFU, peak memory, cost ratio).
for k in 4 2; do
  $PY benchmarks/train_step.py --batch 144 --micro-batches "$k" --steps 3
done
