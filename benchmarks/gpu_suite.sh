#!/usr/bin/env bash
# Everything the performance issue needs from a lent GPU, in one go (budget: under 10 minutes on one H100/H200).
#
#   benchmarks/gpu_suite.sh [--out DIR] [--models DIR] [--budget SECONDS]   # on the GPU machine, repo root
#   benchmarks/gpu_suite.sh --tiny --out DIR                   # the same phases on CPU with the tiny model (smoke)
#   benchmarks/gpu_suite.sh --dry-run                          # print the phase commands only
#
# Phases, most important first, each writing its JSON into DIR as soon as it ends (a phase cut by the
# budget loses only itself): 1. ours vs TRL 0.23.1's DDPOTrainer side by side at the COMPASS setting
# (SD-1.5-shaped random weights, 512 px, 50 DDIM steps, CFG 5, LoRA 4, 32 images/epoch, bf16);
# 2. each performance switch alone against the all-off baseline (10 steps, 8 images: per-step gains);
# 3. TDPO-R's paper-exact critic (decode + ViT-L/14 at all 50 steps) and input_stride 5 and 10 over DDPO;
# 4. (if the budget is left) GRPO and TDPO-R on SD3.5-Medium-shaped random weights in Flow-GRPO's setting.
# Peak memory is in every row. DIR/env.json has the GPU, driver, torch and CUDA versions.
# Packages missing on the GPU image (diffusers, trl, pydantic...) are installed from ./.whl if present
# (benchmarks/gpu_wheels.sh fills it on a machine with PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/gpu-suite}"
models="${TMPDIR:-/tmp}/rt-suite-models"  # the random-weight pipelines (GBs) stay out of the results directory
budget=570
mode=gpu
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --tiny) mode=tiny; shift ;;
    --dry-run) dry=1; shift ;;
    *) echo "error: unknown argument $1; use --out DIR, --models DIR, --budget SECONDS, --tiny or --dry-run" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"

if [ "$mode" = gpu ]; then
  common=(--preset sd15 --device cuda --mixed-precision bf16 --model-dir "$models/sd15" --tower-dir "$models/vit-l14")
  compare=(--compare-trl --images-per-epoch 32 --epochs 2 --warmup-batches 1)
  speedups=(--speedups --steps 10 --images-per-epoch 8 --epochs 2 --warmup-batches 1)
  critic=(--algorithm ddpo,tdpo_r --critic-input-strides 1,5,10 --images-per-epoch 8 --epochs 1)
  flow_common=(--preset sd35m --device cuda --mixed-precision bf16 --model-dir "$models/sd35m" --tower-dir "$models/vit-l14")
  flow=(--algorithm grpo,tdpo_r --images-per-epoch 8 --epochs 1 --warmup-batches 1)
else
  common=(--preset tiny --device cpu --model-dir "$models/tiny" --tower-dir "$models/tiny-tower")
  compare=(--compare-trl --steps 2 --images-per-epoch 4 --grad-accum 1 --epochs 1)
  speedups=(--speedups --skip compile,fused4 --steps 2 --images-per-epoch 4 --grad-accum 1 --epochs 1)
  critic=(--algorithm ddpo,tdpo_r --critic-input-strides 1,2 --steps 2 --images-per-epoch 4 --grad-accum 1 --epochs 1)
  flow_common=()
  flow=()
fi

phase() {  # phase NAME SECONDS ARGS...: one rl_epoch.py run under a time limit, its JSON in $out/NAME.json
  local name="$1" limit="$2"; shift 2
  echo "+ benchmarks/rl_epoch.py ${common[*]} $* --json $out/$name.json"
  [ "$dry" = 1 ] && return 0
  local left=$(( deadline - SECONDS ))
  if [ "$left" -lt 30 ]; then echo "skipped $name: budget spent" | tee -a "$out/skipped.txt"; return 0; fi
  [ "$limit" -gt "$left" ] && limit="$left"
  if ! timeout "$limit" env PYTHONUNBUFFERED=1 "$py" benchmarks/rl_epoch.py "${common[@]}" "$@" --json "$out/$name.json" \
      > "$out/$name.log" 2>&1; then
    echo "phase $name failed or ran past ${limit}s; its log: $out/$name.log" | tee -a "$out/skipped.txt"
    tail -n 5 "$out/$name.log" >&2 || true
  fi
}

if [ "$dry" = 0 ]; then
  if [ "$mode" = gpu ]; then
    if ! command -v nvidia-smi > /dev/null || ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      echo "error: gpu_suite.sh needs a CUDA GPU and a torch that sees it (nvidia-smi and torch.cuda.is_available()); use --tiny for the CPU smoke run" >&2
      exit 2
    fi
    if compgen -G ".whl/*.whl" > /dev/null; then
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rt-site .whl/*.whl
      export PYTHONPATH="/tmp/rt-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  export PYTHONPATH="$PWD/shared${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
  missing=$("$py" -c 'import importlib.util as u; print(" ".join(m for m in ("diffusers", "transformers", "accelerate", "peft", "pydantic", "yaml", "trl", "pandas") if u.find_spec(m) is None))')
  if [ -n "$missing" ]; then
    echo "error: python packages missing: $missing; run benchmarks/gpu_wheels.sh where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
  mkdir -p "$out" "$models"
  "$py" - "$out/env.json" <<'PY'
import json, subprocess, sys, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name()
    query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
    env["driver_memory"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
for name in ("diffusers", "transformers", "accelerate", "peft", "trl"):
    env[name] = __import__(name).__version__
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
PY
fi
deadline=$(( SECONDS + budget ))
phase compare_trl 330 "${compare[@]}"
phase speedups 150 "${speedups[@]}"
phase critic 150 "${critic[@]}"
if [ "${#flow_common[@]}" -gt 0 ]; then  # the flow phase has its own preset (the sd15 arguments do not apply)
  common=("${flow_common[@]}")
  phase flow_sd35m 240 "${flow[@]}"
fi
[ "$dry" = 1 ] || echo "results in $out: $(cd "$out" && ls ./*.json | tr '\n' ' ')"
