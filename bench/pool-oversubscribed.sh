#!/usr/bin/env bash
# CPU decode with the machine's cores oversubscribed: N `bench decode` processes at once,
# each with a pool of all the cores, for each binary given (side by side in one run), and
# one process alone for reference. Usage: bench/pool-oversubscribed.sh MODEL BIN... ;
# PROCS (default 2), THREADS (default: nproc), GEN (default 64).
set -euo pipefail
MODEL=$1; shift
PROCS=${PROCS:-2}; THREADS=${THREADS:-$(nproc)}; GEN=${GEN:-64}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
one() { "$1" bench decode --model "$MODEL" --threads "$THREADS" --gen-tokens "$GEN" 2>/dev/null | tail -1; }
for round in 1 2; do
  for b in "$@"; do
    echo "== $b round $round: alone"; one "$b"
    echo "== $b round $round: $PROCS at once"
    for i in $(seq "$PROCS"); do one "$b" > "$tmp/$i.txt" & done; wait
    cat "$tmp"/*.txt; rm -f "$tmp"/*.txt
  done
done
