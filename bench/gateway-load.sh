#!/usr/bin/env bash
# Load test of the gateway on loopback, bounded in time: aggregate decode tokens/s at
# concurrency 1, 8, 32 and 64 streaming clients against the engine's own batch-1 rate, TTFT
# and inter-token percentiles, failures, server memory before/after; then the latency the
# gateway adds over calling the engine directly.
#   bench/gateway-load.sh [MODEL] [SECONDS_PER_LEVEL] [SECONDS_AT_64]
# Writes bench/results/gateway-load-<model>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-$(scripts/fetch-default-model.sh)}"
SECS="${2:-30}"
SECS64="${3:-60}"
MAX_TOKENS=64
cargo build --release -p switchyard-cli >&2
BIN=target/release/switchyard
NAME=$(basename "$MODEL"); NAME=${NAME%.gguf}
OUT=bench/results/gateway-load-$NAME.json
mkdir -p bench/results
TMP=$(mktemp -d)
trap 'kill $SRV 2>/dev/null || true; rm -rf "$TMP"' EXIT

echo "engine alone, batch 1 ..." >&2
$BIN bench decode --model "$MODEL" --batch 1 --prompt-tokens 16 --gen-tokens $MAX_TOKENS --reps 3 --json > "$TMP/engine.json"

$BIN serve --host 127.0.0.1 --port 0 --model "$MODEL" --max-batch 64 --max-waiting 512 2> "$TMP/server.log" &
SRV=$!
for _ in $(seq 600); do
  URL=$(grep -o 'listening on http://[0-9.:]*' "$TMP/server.log" | head -1 | sed 's/listening on //') || true
  [ -n "${URL:-}" ] && curl -sf "$URL/health" >/dev/null && break
  sleep 0.1
done
echo "gateway at $URL" >&2
for C in 1 8 32 64; do
  D=$SECS; [ "$C" = 64 ] && D=$SECS64
  echo "concurrency $C for $D s ..." >&2
  $BIN bench serve --url "$URL" --concurrency $C --duration "$D" --max-tokens $MAX_TOKENS --json > "$TMP/c$C.json"
done
curl -s "$URL/metrics" | grep -E '^switchyard_(batch_size|requests_total|queue_time_seconds_(sum|count))' > "$TMP/metrics.txt" || true
kill -TERM $SRV; wait $SRV || true

echo "gateway overhead ..." >&2
$BIN bench gateway --model "$MODEL" --reps 40 --max-tokens 16 --json > "$TMP/overhead.json"

python3 - "$TMP" "$OUT" "$MODEL" <<'PY'
import json, sys, platform, os
tmp, out, model = sys.argv[1:4]
eng = json.load(open(f"{tmp}/engine.json"))
levels = {c: json.load(open(f"{tmp}/c{c}.json")) for c in (1, 8, 32, 64)}
tg1 = eng["decode_tok_s"]
res = {
  "model": model,
  "machine": f"{os.cpu_count()} vCPU {platform.processor() or platform.machine()}",
  "engine_batch1": eng,
  "engine_batch1_decode_tokens_per_s": tg1,
  "levels": levels,
  "speedup_vs_engine_batch1": {c: (v["decode_tokens_per_s"] / tg1 if tg1 else None) for c, v in levels.items()},
  "gateway_overhead": json.load(open(f"{tmp}/overhead.json")),
  "server_metrics_at_end": open(f"{tmp}/metrics.txt").read().splitlines(),
}
json.dump(res, open(out, "w"), indent=1)
print(f"wrote {out}")
for c, v in levels.items():
    print(f"c={c:3d} ok={v['requests_ok']:5d} failed={v['requests_failed']} tok/s={v['decode_tokens_per_s']:8.1f} "
          f"ttft p50={v['ttft_s']['p50']*1e3:7.1f}ms p99={v['ttft_s']['p99']*1e3:7.1f}ms "
          f"itl p50={v['itl_s']['p50']*1e3:6.1f}ms rss={v['server_rss_bytes']}")
print("engine batch-1 tok/s", tg1)
print("overhead", res["gateway_overhead"]["overhead_ms"], "ms")
PY
