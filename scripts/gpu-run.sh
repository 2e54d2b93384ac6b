#!/usr/bin/env bash
# GPU checks and benchmarks, run on a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-run.sh DIR [OUT]
#
# DIR holds what scripts/gpu-pack.sh put there (the release binary, the GPU test binary,
# stories260K, optionally the SmolLM2 GGUF). Results (JSON, logs) go to OUT (default
# bench/results). The CUDA libraries are found on the machine (cudarc loads them at run
# time): libcuda from the driver, libnvrtc and libcublas from a CUDA install or pip wheels.
set -uo pipefail
DIR=${1:?usage: gpu-run.sh DIR [OUT]}
OUT=${2:-bench/results}
STEPS=${STEPS:-tests,check,smolshape,bench,long,larosa,torch,serve}
mkdir -p "$OUT"
libdirs=$(find /usr/local /usr/lib /opt -name 'libnvrtc.so*' -o -name 'libcublas.so*' 2>/dev/null \
  | grep -v /stubs/ | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
export SWITCHYARD_STORIES="$DIR/stories260K" SWITCHYARD_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-device.txt"
BIN="$DIR/switchyard"
if [[ $STEPS == *tests* ]]; then
  echo "== GPU tests"
  "$DIR/cuda-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/gpu-tests.log"
fi
if [[ $STEPS == *check* ]]; then
  echo "== stories260K golden text through the CLI on the GPU"
  "$BIN" generate --model "$DIR/stories260K" --device cuda --max-tokens 40 2>&1 | tail -3
  if [[ -f $DIR/smollm2.gguf ]]; then
    echo "== SmolLM2 on the GPU"
    "$BIN" generate --model "$DIR/smollm2.gguf" --device cuda --chat "What is the capital of France?" --max-tokens 24 2>&1 | tee "$OUT/gpu-smollm2-paris.txt"
    "$BIN" bench gpu --model "$DIR/smollm2.gguf" --check-tokens 64 --batch 1,8,32,64 --prefill 512 --json > "$OUT/gpu-smollm2.json"
  fi
fi
if [[ $STEPS == *smolshape* ]]; then
  echo "== SmolLM2 shapes (dummy weights saved once): GPU vs CPU logits on the same weights"
  W=${TMPDIR:-/tmp}/smollm2-dummy
  "$BIN" bench gpu --dummy smollm2-135m --save-weights "$W"
  "$BIN" bench gpu --model "$W" --check-tokens 64 --batch 1,8,32,64 --prefill 512 --json > "$OUT/gpu-smollm2-shapes.json"
fi
if [[ $STEPS == *bench* ]]; then
  echo "== Llama-2-7B shapes, dummy bf16 weights"
  "$BIN" bench gpu --dummy llama2-7b --batch ${BATCH:-1,8,32,64} --prompt 128 --gen ${GEN:-128} \
    --prefill 512,2048 --baseline --products --json > "$OUT/gpu-llama2-7b.json"
fi
if [[ $STEPS == *long* ]]; then
  echo "== Llama-2-7B shapes, 600 decode steps (sequences cross KV pages during decode)"
  # Pages mapped by the allocator's background thread (default), then inside the step.
  "$BIN" bench gpu --dummy llama2-7b --batch 1,64 --prompt 100 --gen 600 --prefill 512 \
    --json > "$OUT/gpu-llama2-7b-long.json"
  "$BIN" bench gpu --dummy llama2-7b --batch 1,64 --prompt 100 --gen 600 --prefill 512 \
    --kv-mode sync --json > "$OUT/gpu-llama2-7b-long-sync.json"
fi
if [[ $STEPS == *larosa* ]]; then
  echo "== LaRoSA on Llama-2-7B shapes: batch-1 decode at 40% and 50% sparsity vs dense"
  "$BIN" bench gpu --dummy llama2-7b --batch 1 --prompt 128 --gen ${GEN:-128} --prefill 512 \
    --larosa 0.4,0.5 --json > "$OUT/gpu-llama2-7b-larosa.json"
fi
if [[ $STEPS == *torch* ]]; then
  echo "== PyTorch + transformers on the same Llama-2-7B-shaped weights"
  W=${TMPDIR:-/tmp}/llama2-7b-dummy
  "$BIN" bench gpu --dummy llama2-7b --save-weights "$W"
  PYTHONUNBUFFERED=1 python3 bench/torch_baseline.py "$W" --batch ${BATCH:-1,8,32,64} --prompt 128 --gen ${GEN:-128} > "$OUT/gpu-torch-llama2-7b.json"
fi
if [[ $STEPS == *serve* ]]; then
  echo "== The gateway on the GPU: stories260K served, sampled on the device"
  log=${TMPDIR:-/tmp}/serve-gpu.log
  "$BIN" serve --model "$DIR/stories260K" --device cuda --port 18181 > "$log" 2>&1 &
  pid=$!
  python3 - <<'PY' 2>&1 | tee "$OUT/gpu-serve-sampling.txt"
import json, time, urllib.request
url = "http://127.0.0.1:18181/v1/completions"
def ask(**kw):
    body = dict(model="stories260K", prompt="Once upon a time", max_tokens=40, **kw)
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    for _ in range(240):  # until the model is loaded (503 before, no socket before that)
        try:
            return json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
        except Exception as e:
            if getattr(e, "code", 503) != 503:
                raise
            time.sleep(0.5)
    raise SystemExit("the model never became ready")
print("greedy:", repr(ask(temperature=0)))
a = ask(temperature=0.9, top_p=0.9, seed=7)
b = ask(temperature=0.9, top_p=0.9, seed=7)
c = ask(temperature=0.9, top_p=0.9, seed=8)
print("seed 7:", repr(a)); print("seed 7 again:", repr(b)); print("seed 8:", repr(c))
print("same seed, same text:", a == b, "| other seed differs:", a != c)
PY
  kill $pid; wait $pid 2>/dev/null
  grep -i "cuda\|device" "$log" | head -3
fi
