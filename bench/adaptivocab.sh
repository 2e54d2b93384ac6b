#!/usr/bin/env bash
# AdaptiVocab on SmolLM2-135M-Instruct, every number of the issue in one run (CPU):
#  1. patches from linux-doc-6.1's train split (K = 5000, 8000, 10000);
#  2. token reduction on held-out linux-doc, python3.11-doc and generic English (fortunes),
#     both matching rules, round trip checked on every file;
#  3. the patched model (transform adaptivocab) and the base model as f32 safetensors;
#  4. bits per byte, base vs patched (no fine-tune), on a held-out linux-doc excerpt;
#  5. WebAssembly vs native encode/decode per 1,000 tokens;
#  6. end to end through a gateway serving both (bench/adaptivocab_e2e.py).
# Output: bench/results/adaptivocab-SmolLM2-135M.json. Needs apt-get (corpora), ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
scripts/fetch-corpora.sh
cargo build --release -p switchyard-cli -p switchyard-adaptivocab-transform -p switchyard-transform-identity
scripts/build-wasm-plugins.sh plugins/adaptivocab
SY=target/release/switchyard
M=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
C=.cache/corpora
W=.cache/av
mkdir -p "$W" bench/results
R=$W/results.jsonl
: > "$R"
for K in 5000 8000 10000; do
  $SY vocab build --model $M --corpus $C/linux-doc/train --replace $K --out $W/linux-$K.json --json \
    | python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({'step':'build','K':$K,**v}))" >> "$R"
  for d in linux-doc python-doc generic; do
    for m in longest selection-order; do
      $SY vocab eval --model $M --patch $W/linux-$K.json --file $C/$d/test --matching $m --json \
        | python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({'step':'eval','K':$K,'domain':'$d',**v}))" >> "$R"
    done
  done
done
$SY transform adaptivocab --model $M --patch $W/linux-8000.json --out $W/smollm2-linux --force
$SY transform run --plugin target/release/libswitchyard_transform_identity.so --model $M --out $W/smollm2-f32 --dtype f32 --force
python3 - "$C/linux-doc/test" "$W/linux-heldout.txt" <<'PY'
import gzip, os, sys
src, out = sys.argv[1:]
n = 0
with open(out, "w") as o:
    for f in sorted(os.listdir(src)):
        t = gzip.open(os.path.join(src, f)).read().decode("utf-8", "replace")
        o.write(t + "\n"); n += len(t)
        if n > 120000: break
PY
$SY eval perplexity --model $W/smollm2-f32 --file $W/linux-heldout.txt --json \
  | python3 -c "import json,sys; print(json.dumps({'step':'ppl','model':'base f32',**json.load(sys.stdin)}))" >> "$R"
$SY eval perplexity --model $W/smollm2-linux --patch $W/linux-8000.json --file $W/linux-heldout.txt --json \
  | python3 -c "import json,sys; print(json.dumps({'step':'ppl','model':'patched K=8000, no fine-tune',**json.load(sys.stdin)}))" >> "$R"
$SY vocab bench --model $M --patch $W/linux-8000.json --plugin target/wasm-plugins/adaptivocab/adaptivocab.toml \
  --file $C/linux-doc/test --json \
  | python3 -c "import json,sys; print(json.dumps({'step':'wasm-vs-native',**json.load(sys.stdin)}))" >> "$R"
cat > $W/gw.toml <<TOML
[server]
port = 18090
plugin_dirs = ["$PWD/target/wasm-plugins/adaptivocab"]

[[models]]
name = "smollm2"
path = "$PWD/$W/smollm2-f32"

[[models]]
name = "smollm2-linux"
path = "$PWD/$W/smollm2-f32"

[models.pipeline.tokenizer_patch]
plugin = "adaptivocab"
model = "$PWD/$W/smollm2-linux"
TOML
$SY serve --config $W/gw.toml > $W/gw.log 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf localhost:18090/health >/dev/null && break; sleep 1; done
python3 bench/adaptivocab_e2e.py http://127.0.0.1:18090 smollm2 smollm2-linux $C/linux-doc/test 8 64 > $W/e2e.json
python3 - "$R" "$W/e2e.json" <<'PY'
import json, platform, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
e2e = json.load(open(sys.argv[2]))
out = {"machine": f"{platform.machine()} {os.cpu_count()} cores (CPU)", "model": "SmolLM2-135M-Instruct",
       "split": "sorted file paths, every 10th file held out (test); patches built from the rest",
       "results": rows, "end_to_end": e2e}
json.dump(out, open("bench/results/adaptivocab-SmolLM2-135M.json", "w"), indent=1)
print("wrote bench/results/adaptivocab-SmolLM2-135M.json")
PY
