#!/usr/bin/env bash
# GPU proof: our QLoRA NF4 + LoRA r=64 + ZeRO-2 + packing on a 7B-shaped Llama vs the plain
# QLoRA recipe, then chat-engine decode with the adapter attached vs merged. One command.
#
# On any machine with a CUDA GPU and a shell (after bench/fetch_gpu_wheels.sh filled
# bench/wheels/ on a connected one and the checkout was copied there with it):
#   set -o pipefail; bash bench/gpu_qlora.sh 2>&1 | tee gpu_qlora.log
# Here, on a CPU, the same path with a 2-layer hidden-64 stand-in (about a minute):
#   . .venv/bin/activate && bash bench/gpu_qlora.sh --tiny
# Options go to bench/gpu_qlora.py (--steps, --warmup, --seq, --budget, --skip decode, ...).
# Results: $OUT (or bench/out/) gpu_qlora.json, gpu_qlora.md, gpu_qlora-children.log.
# The driver keeps to --budget (420 s by default) and the whole script to 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
KIT=${MEDCHAT_BENCH_KIT:-bench/wheels}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
t0=$(date +%s)

# Install what the GPU machine lacks (bitsandbytes, deepspeed, datasets, openpyxl, and the tested
# transformers/peft) into a private folder put first on PYTHONPATH; where all of it imports
# already (this project's venv) nothing is installed. The checkout itself goes on PYTHONPATH
# below, so `training` and `medchat` import without installing the project.
if [ -n "${MEDCHAT_BENCH_INSTALL:-}" ] || ! "$PY" -c "import bitsandbytes, deepspeed, datasets, openpyxl" >/dev/null 2>&1; then
  if ! ls "$KIT"/*.whl >/dev/null 2>&1; then
    echo "bitsandbytes/deepspeed/datasets/openpyxl are missing and $KIT holds no wheels:" \
         "run bench/fetch_gpu_wheels.sh on a connected machine and carry $KIT" >&2
    exit 2
  fi
  SITE=${MEDCHAT_BENCH_SITE:-/tmp/medchat-bench-site}
  rm -rf "$SITE"
  echo "installing $(ls "$KIT"/*.whl "$KIT"/*.tar.gz | wc -l) packages from $KIT into $SITE"
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --no-build-isolation --disable-pip-version-check --target "$SITE" "$KIT"/*.whl "$KIT"/deepspeed-*.tar.gz
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import importlib.metadata as m; print('versions:', ', '.join(f'{p} {m.version(p)}' for p in ('torch','transformers','peft','accelerate','bitsandbytes','deepspeed','datasets','pyarrow')))"

# 8 minutes for the whole script: the driver plans its phases to end 15 s before, `timeout` is
# the backstop (the driver still writes what it measured when stopped).
export MEDCHAT_BENCH_DEADLINE=$(( t0 + 480 - 15 )) MEDCHAT_BENCH_ENTRY="bash bench/gpu_qlora.sh"
exec timeout -k 10 $(( t0 + 480 - $(date +%s) )) "$PY" -u bench/gpu_qlora.py "$@"
