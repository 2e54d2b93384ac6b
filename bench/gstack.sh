#!/usr/bin/env bash
# Gstack growth of the default model (SmolLM2-135M-Instruct, 30 layers): the transform's
# throughput and peak memory, then batch-1 decode and memory of the original (Q4_1 GGUF), the
# same model written by the transform with g = 1 (f32 safetensors, the like-for-like peer),
# and the grown x4 model (120 layers) in f32 and bf16, side by side in one run.
# Writes bench/results/gstack-SmolLM2-135M.json. Needs ~4 GB of disk under .cache/gstack.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p switchyard-cli -p switchyard-gstack --quiet
./scripts/fetch-default-model.sh >/dev/null
B=target/release/switchyard
M=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
D=.cache/gstack
mkdir -p "$D"
tmp=$(mktemp -d)
transform() { # name factor dtype
  /usr/bin/time -f '%M' -o "$tmp/$1.rss" \
    $B transform gstack --model "$M" --factor "$2" --dtype "$3" --out "$D/$1" --force --json > "$tmp/$1.t.json"
}
decode() { # name path
  /usr/bin/time -f '%M' -o "$tmp/$1.drss" \
    $B bench decode --model "$2" --batch 1 --prompt-tokens 64 --gen-tokens 32 --reps 3 --json > "$tmp/$1.d.json" 2>/dev/null
}
transform smollm2-g1-f32 1 f32
transform smollm2-x4-f32 4 f32
transform smollm2-x4-bf16 4 bf16
decode original "$M"
decode g1-f32 "$D/smollm2-g1-f32"
decode x4-f32 "$D/smollm2-x4-f32"
decode x4-bf16 "$D/smollm2-x4-bf16"
python3 - "$tmp" "$M" "$D" <<'PY' > bench/results/gstack-SmolLM2-135M.json
import json, os, sys
tmp, model, d = sys.argv[1:]
cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
out = {"machine": f"{cpu}, {os.cpu_count()} vCPU", "input": model, "transforms": {}, "decode_batch1": {}}
for n in ["smollm2-g1-f32", "smollm2-x4-f32", "smollm2-x4-bf16"]:
    t = json.load(open(f"{tmp}/{n}.t.json"))
    t["peak_rss_mib"] = int(open(f"{tmp}/{n}.rss").read().split()[-1]) / 1024
    t["file_bytes"] = sum(os.path.getsize(os.path.join(d, n, f)) for f in t["shards"])
    out["transforms"][n] = t
for n in ["original", "g1-f32", "x4-f32", "x4-bf16"]:
    r = json.load(open(f"{tmp}/{n}.d.json"))
    r["peak_rss_mib"] = int(open(f"{tmp}/{n}.drss").read().split()[-1]) / 1024
    out["decode_batch1"][n] = r
base = out["decode_batch1"]["g1-f32"]
for n, r in out["decode_batch1"].items():
    r["decode_speed_vs_g1_f32"] = r["decode_tok_s"] / base["decode_tok_s"]
print(json.dumps(out, indent=2))
PY
rm -rf "$tmp"
cat bench/results/gstack-SmolLM2-135M.json
