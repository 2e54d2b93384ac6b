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
STEPS=${STEPS:-tests,check,smolshape,bench,attention,long,larosa,torch,serve,larosa-serve}
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
  echo "== batches 4-64 on cuBLAS GemmEx alone (no stream-K at 3-8, no cuBLASLt at 9-16)"
  SWITCHYARD_SK=0 SWITCHYARD_BLASLT=0 "$BIN" bench gpu --dummy llama2-7b --batch 4,8,16,32,64 \
    --prompt 128 --gen ${GEN:-128} --prefill 512 --json > "$OUT/gpu-llama2-7b-gemmex.json"
  echo "== the stream-K sk* products at every batch 4-64 (SWITCHYARD_SK=1, fragment layout)"
  SWITCHYARD_SK=1 SWITCHYARD_SK_TILED=1 "$BIN" bench gpu --dummy llama2-7b --batch 4,8,16,32,64 \
    --prompt 128 --gen ${GEN:-128} --prefill 512 --json > "$OUT/gpu-llama2-7b-sk.json"
  echo "== the same at batch 4 and 8 with our tensor-core products (split-K mms*, then mm*)"
  "$BIN" bench gpu --dummy llama2-7b --batch 4,8 --prompt 128 --gen ${GEN:-128} --prefill 512 \
    --mm-max 8 --json > "$OUT/gpu-llama2-7b-mms.json"
  "$BIN" bench gpu --dummy llama2-7b --batch 4,8 --prompt 128 --gen ${GEN:-128} --prefill 512 \
    --mm-max 8 --no-mm-split --json > "$OUT/gpu-llama2-7b-mm.json"
  echo "== decode without programmatic dependent launch (each kernel waits for the last to end)"
  SWITCHYARD_PDL=0 "$BIN" bench gpu --dummy llama2-7b --batch ${BATCH:-1,8,32,64} --prompt 128 \
    --gen ${GEN:-128} --prefill 512 --json > "$OUT/gpu-llama2-7b-nopdl.json"
  echo "== decode with the previous attention kernel (2 positions per warp iteration, not 4)"
  SWITCHYARD_ATT_U=2 "$BIN" bench gpu --dummy llama2-7b --batch 8,32,64 --prompt 128 \
    --gen ${GEN:-128} --prefill 512 --json > "$OUT/gpu-llama2-7b-att2.json"
  echo "== batches 1-8 and the products with the driver's L2 fetch granularity (not 128 bytes)"
  SWITCHYARD_L2_FETCH=0 "$BIN" bench gpu --dummy llama2-7b --batch 1,4,8 --prompt 128 \
    --gen ${GEN:-128} --prefill 512 --products --json > "$OUT/gpu-llama2-7b-l2fetch.json"
  echo "== batches 16-64 and prefill with one cuBLAS product per matrix (not batched)"
  SWITCHYARD_BLAS_BATCHED=0 "$BIN" bench gpu --dummy llama2-7b --batch 16,32,64 --prompt 128 \
    --gen ${GEN:-128} --prefill 512,2048 --json > "$OUT/gpu-llama2-7b-unbatched.json"
fi
if [[ $STEPS == *attention* ]]; then
  echo "== decode attention's variants at batch 32 and 64 (default first and last)"
  att() { # name, then env settings
    local name=$1; shift
    env "$@" "$BIN" bench gpu --dummy llama2-7b --batch 32,64 --prompt 128 --gen ${GEN:-128} \
      --prefill 512 --json > "$OUT/gpu-attention-$name.json"
  }
  att default X=1
  att half-warp SWITCHYARD_ATT_HW=1
  att half-warp-u4 SWITCHYARD_ATT_HW=1 SWITCHYARD_KERNEL_DEFINES=ATT_HW_U=4
  att half-warp-mb5 SWITCHYARD_ATT_HW=1 SWITCHYARD_KERNEL_DEFINES=ATT_MIN_BLOCKS=5
  att min-blocks5 SWITCHYARD_KERNEL_DEFINES=ATT_MIN_BLOCKS=5
  att warps4 SWITCHYARD_KERNEL_DEFINES=ATT_WARPS=4
  att warps16 SWITCHYARD_KERNEL_DEFINES=ATT_WARPS=16
  att blocks2048 SWITCHYARD_ATT_BLOCKS=2048
  att default-again X=1
  att half-warp-again SWITCHYARD_ATT_HW=1
  if command -v ncu > /dev/null; then
    for v in default:X=1 half-warp:SWITCHYARD_ATT_HW=1; do
      SWITCHYARD_CUDA_GRAPHS=0 env "${v#*:}" ncu --kernel-name regex:attention --launch-skip 200 \
        --launch-count 1 --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__waves_per_multiprocessor \
        "$BIN" bench gpu --dummy llama2-7b --batch 32 --prompt 128 --gen 16 --prefill 512 \
        > "$OUT/gpu-attention-ncu-${v%%:*}.txt" 2>&1
    done
  fi
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
if [[ $STEPS == *larosa-serve* ]]; then
  echo "== LaRoSA from a pipeline configuration: stories260K rotated, 40% sparsity, GPU vs CPU gateway"
  W=${TMPDIR:-/tmp}/larosa-serve
  rm -rf "$W" && mkdir -p "$W/plugins"
  # A calibration text sampled from the model itself, and the rotation.
  for s in 1 2 3 4 5 6 7 8; do
    "$BIN" generate --model "$DIR/stories260K" --prompt "Once upon a time" --max-tokens 300 \
      --temperature 1 --seed $s 2>/dev/null >> "$W/corpus.txt"
  done
  "$BIN" calibrate larosa --model "$DIR/stories260K" --text "$W/corpus.txt" --tokens 2048 \
    --window 256 --out "$W/rot.safetensors" --json > "$W/calibration.json" 2>/dev/null
  cp "$DIR/libswitchyard_larosa.so" "$W/plugins/"
  sha=$(sha256sum "$W/plugins/libswitchyard_larosa.so" | cut -d' ' -f1)
  printf 'name = "larosa"\nversion = "0.1.0"\nkind = "linear-kernels"\nabi = "1.1"\nfile = "libswitchyard_larosa.so"\nsha256 = "%s"\n' "$sha" > "$W/plugins/larosa.toml"
  for dev in cuda cpu; do
    port=$([[ $dev == cuda ]] && echo 18182 || echo 18183)
    cat > "$W/$dev.toml" <<TOML
[server]
port = $port
plugin_dirs = ["$W/plugins"]
[[models]]
name = "stories260K"
path = "$DIR/stories260K"
device = "$dev"
threads = 4
[models.pipeline]
linear_kernels = { plugin = "larosa", config = "sparsity = 0.4", rotation = "$W/rot.safetensors" }
TOML
    "$BIN" serve --config "$W/$dev.toml" > "$W/$dev.log" 2>&1 &
    echo $! > "$W/$dev.pid"
  done
  python3 - "$W" <<'PY' 2>&1 | tee "$OUT/gpu-larosa-serve.txt"
import json, sys, time, urllib.request
W = sys.argv[1]
def call(port, path, body=None):
    url = f"http://127.0.0.1:{port}{path}"
    req = urllib.request.Request(url, json.dumps(body).encode() if body else None,
                                 {"Content-Type": "application/json"})
    for _ in range(240):
        try:
            return json.load(urllib.request.urlopen(req, timeout=60))
        except Exception as e:
            if getattr(e, "code", 503) != 503:
                raise
            time.sleep(0.5)
    raise SystemExit(f"port {port}: the model never became ready")
body = dict(model="stories260K", prompt="Once upon a time", max_tokens=60, temperature=0)
texts = {}
for dev, port in (("cuda", 18182), ("cpu", 18183)):
    texts[dev] = call(port, "/v1/completions", body)["choices"][0]["text"]
    info = call(port, "/v1/models/stories260K")
    print(dev, "pipeline:", json.dumps(info.get("pipeline", info))[:400])
    print(dev, "greedy:", repr(texts[dev]))
a, b = texts["cuda"].split(), texts["cpu"].split()
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"GPU and CPU LaRoSA gateways agree on the first {same} of {len(b)} words")
PY
  for dev in cuda cpu; do kill "$(cat "$W/$dev.pid")"; done
  wait 2>/dev/null
  grep -i "device weights\|LaRoSA\|error" "$W/cuda.log" | head -5
fi
