#!/usr/bin/env bash
# LaRoSA on SmolLM2-135M-Instruct (f32 weights), every number of the issue in one run (CPU):
#  1. rotations calibrated on linux-doc-6.1's train split (10 x 2048 tokens, as the reference's
#     10 x 2048 of WikiText-2 train);
#  2. perplexity on held-out linux-doc files (the test split; never seen in calibration):
#     dense, LaRoSA and unrotated top-k (TEAL-style) at s = 0.25, 0.4, 0.5;
#  3. batch-1 decode tokens/s, dense (engine) vs LaRoSA at 0.4 and 0.5 (f32 and q8 columns),
#     side by side in one run, with the bound set by bytes read.
# Output: bench/results/larosa-SmolLM2-135M.json. Needs apt-get (corpora); ~40 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
scripts/fetch-corpora.sh
cargo build --release -p switchyard-cli -p switchyard-larosa -p switchyard-transform-identity
SY=target/release/switchyard
M=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
F32=.cache/av/smollm2-f32
C=.cache/corpora
W=.cache/larosa
mkdir -p "$W" bench/results
[ -f $F32/model.safetensors ] || $SY transform run --plugin target/release/libswitchyard_transform_identity.so --model $M --out $F32 --dtype f32 --force
ROT=$W/smollm2-linuxdoc.safetensors
[ -f $ROT ] || $SY calibrate larosa --model $F32 --text $C/linux-doc/train --tokens 20480 --window 2048 --out $ROT --json > $W/calibrate.json
# Held-out text: the first 24 KB of the linux-doc test split (sorted files).
python3 - "$C/linux-doc/test" "$W/heldout.txt" <<'PY'
import gzip, os, sys
src, out = sys.argv[1:]
text = ""
for f in sorted(os.listdir(src)):
    text += gzip.open(os.path.join(src, f)).read().decode("utf-8", "replace") + "\n"
    if len(text) > 24000:
        break
open(out, "w").write(text[:24000])
PY
R=$W/quality.jsonl
: > "$R"
ppl() { $SY eval perplexity --model $F32 --file $W/heldout.txt --ctx 512 --json "$@" 2>/dev/null; }
ppl >> "$R"
for s in 0.25 0.4 0.5; do
  ppl --rotation $ROT --linear "sparsity = $s" >> "$R"
  ppl --linear "sparsity = $s" >> "$R"
done
# Diagnostic: only the inputs the rotation touches (q/k/v, gate/up) sparsified at 0.8 s.
R2=$W/quality-inputs-only.jsonl
: > "$R2"
ppl --rotation $ROT --linear "sparsity = 0.5
coef_out = 0" >> "$R2"
ppl --linear "sparsity = 0.5
coef_out = 0" >> "$R2"
$SY bench larosa --model $F32 --rotation $ROT --sparsity 0.4,0.5 --gen-tokens 64 --reps 5 --json > $W/speed-f32.json
$SY bench larosa --model $F32 --rotation $ROT --sparsity 0.4,0.5 --storage q8 --gen-tokens 64 --reps 3 --json > $W/speed-q8.json
python3 - "$W" <<'PY'
import json, os, platform, sys
w = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(w, "quality.jsonl"))]
def kind(r):
    if r["linear"] is None: return "dense"
    return "larosa" if r["rotation"] else "topk-unrotated"
def row(r):
    return {"method": kind(r), "linear_config": r["linear"],
            "sparsity": float(r["linear"].split("\n")[0].split("=")[1]) if r["linear"] else 0.0,
            "ppl": r["ppl"], "bits_per_byte": r["bits_per_byte"], "tokens_scored": r["tokens"],
            "seconds": r["seconds"]}
quality = [row(r) for r in rows]
inputs_only = [row(json.loads(l)) for l in open(os.path.join(w, "quality-inputs-only.jsonl"))]
out = {
    "machine": [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0] + f", {os.cpu_count()} cores (CPU only)",
    "model": ".cache/av/smollm2-f32 (SmolLM2-135M-Instruct Q4_1 GGUF dequantized to f32)",
    "calibration": json.load(open(os.path.join(w, "calibrate.json"))),
    "heldout": "first 24,000 chars of linux-doc-6.1 test split (files never used in calibration), ctx 512",
    "quality": quality,
    "quality_rotated_inputs_only": inputs_only,
    "speed_f32": json.load(open(os.path.join(w, "speed-f32.json"))),
    "speed_q8": json.load(open(os.path.join(w, "speed-q8.json"))),
}
json.dump(out, open("bench/results/larosa-SmolLM2-135M.json", "w"), indent=1)
for q in quality: print(f'{q["method"]:>15} s={q["sparsity"]:.2f}  ppl {q["ppl"]:.3f}  bpb {q["bits_per_byte"]:.4f}')
PY
