#!/usr/bin/env bash
# Side-by-side CPU benchmark: switchyard vs llama.cpp's llama-bench on the same GGUF, the same
# thread count, the same pp/tg sizes, alternating runs in one session so both see the same
# machine state. Writes bench/results/cpu-<model>-vs-llama.cpp.json.
#
# llama.cpp is built from the source in the PyPI sdist llama-cpp-python==0.3.36
# (vendor/llama.cpp, commit 0c1e570): needs cmake and ninja (pip install cmake ninja).
#
#   bench/compare-llama-cpp.sh [MODEL.gguf] [THREADS] [ROUNDS]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SWITCHYARD_CACHE:-$ROOT/.cache}"
MODEL="${1:-$("$ROOT/scripts/fetch-default-model.sh")}"
THREADS="${2:-2}"
ROUNDS="${3:-5}"
PP=128; TG=64

LLAMA="$CACHE/llama.cpp"
if [ ! -x "$LLAMA/build/bin/llama-bench" ]; then
  mkdir -p "$CACHE/sdist" "$LLAMA"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$CACHE/sdist" llama-cpp-python==0.3.36
  tar xzf "$CACHE/sdist/llama_cpp_python-0.3.36.tar.gz" -C "$LLAMA" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
  python3 -m pip install --quiet cmake ninja
  cmake -S "$LLAMA" -B "$LLAMA/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$LLAMA/build" --target llama-bench llama-perplexity >/dev/null
fi
cargo build --release -q -p switchyard-cli --manifest-path "$ROOT/Cargo.toml"
SY="$ROOT/target/release/switchyard"

out="$ROOT/bench/results/cpu-$(basename "$MODEL" .gguf)-vs-llama.cpp.json"
tmp=$(mktemp -d)
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  "$SY" bench decode --model "$MODEL" --threads "$THREADS" --prompt-tokens $PP --gen-tokens $TG --reps 3 --json 2>/dev/null > "$tmp/sy.$r.json"
  "$LLAMA/build/bin/llama-bench" -m "$MODEL" -t "$THREADS" -p $PP -n $TG -r 3 -o json 2>/dev/null > "$tmp/ll.$r.json"
done
python3 - "$tmp" "$ROUNDS" "$out" "$MODEL" "$THREADS" <<'PY'
import json, sys, statistics, platform, subprocess
tmp, rounds, out, model, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
sy_pp, sy_tg, ll_pp, ll_tg = [], [], [], []
for r in range(1, rounds + 1):
    s = json.load(open(f"{tmp}/sy.{r}.json"))
    sy_pp.append(s["prefill_tok_s"]); sy_tg.append(s["decode_tok_s"])
    for t in json.load(open(f"{tmp}/ll.{r}.json")):
        (ll_pp if t["n_prompt"] > 0 else ll_tg).append(t["avg_ts"])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
med = statistics.median
res = {
    "model": model, "threads": threads, "pp": 128, "tg": 64, "rounds": rounds, "cpu": cpu,
    "switchyard": {"prefill_tok_s": med(sy_pp), "decode_tok_s": med(sy_tg), "prefill_runs": sy_pp, "decode_runs": sy_tg},
    "llama_cpp": {"prefill_tok_s": med(ll_pp), "decode_tok_s": med(ll_tg), "prefill_runs": ll_pp, "decode_runs": ll_tg,
                  "build": "llama-cpp-python 0.3.36 vendor/llama.cpp (0c1e570), GGML_NATIVE=ON"},
    "ratio_prefill": med(sy_pp) / med(ll_pp), "ratio_decode": med(sy_tg) / med(ll_tg),
    "ratio_prefill_per_round": [a / b for a, b in zip(sy_pp, ll_pp)],
    "ratio_decode_per_round": [a / b for a, b in zip(sy_tg, ll_tg)],
}
json.dump(res, open(out, "w"), indent=1)
print(f"prefill pp128: switchyard {med(sy_pp):.1f} tok/s, llama.cpp {med(ll_pp):.1f} tok/s, ratio {res['ratio_prefill']:.2f}")
print(f"decode  tg64 : switchyard {med(sy_tg):.1f} tok/s, llama.cpp {med(ll_tg):.1f} tok/s, ratio {res['ratio_decode']:.2f}")
print(f"written {out}")
PY
