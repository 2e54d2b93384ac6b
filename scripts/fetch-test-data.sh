#!/usr/bin/env bash
# Test data that is not in the repository:
#  - the default model (scripts/fetch-default-model.sh);
#  - llama.cpp's tokenizer test vectors (vocabulary-only GGUF files with .inp/.out pairs),
#    from the PyPI source package llama-cpp-python==0.3.36 (MIT), into .cache/vocab/;
#  - a Python virtual environment with the official `openai` client and kubernetes-validate
#    (Kubernetes schemas for the deploy/ checks), in .cache/venv/;
#  - Debian's prometheus package (prometheus and promtool, for the deploy/ tests);
#  - NVIDIA's NVRTC library (the PyPI wheel nvidia-cuda-nvrtc, into .cache/nvrtc/): the CUDA
#    kernels are compiled by it in a test, no GPU needed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SWITCHYARD_CACHE:-$ROOT/.cache}"
"$ROOT/scripts/fetch-default-model.sh" >/dev/null
VOCAB="$CACHE/vocab"
if [ ! -f "$VOCAB/.complete" ]; then
  mkdir -p "$VOCAB" "$CACHE/sdist"
  echo "fetching llama-cpp-python==0.3.36 (source) from PyPI for tokenizer test vectors ..." >&2
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --disable-pip-version-check \
    -d "$CACHE/sdist" llama-cpp-python==0.3.36 >&2
  python3 - "$CACHE/sdist/llama_cpp_python-0.3.36.tar.gz" "$VOCAB" <<'PY'
import sys, tarfile, os
src, out = sys.argv[1], sys.argv[2]
keep = ("llama-spm", "gpt-2", "llama-bpe", "starcoder", "qwen2")
with tarfile.open(src) as t:
    for m in t.getmembers():
        base = os.path.basename(m.name)
        if "/vendor/llama.cpp/models/ggml-vocab-" in m.name and any(base.startswith(f"ggml-vocab-{k}.gguf") for k in keep):
            with t.extractfile(m) as f, open(os.path.join(out, base), "wb") as o:
                o.write(f.read())
        elif m.name.endswith("/vendor/llama.cpp/LICENSE"):
            with t.extractfile(m) as f, open(os.path.join(out, "LICENSE"), "wb") as o:
                o.write(f.read())
PY
  touch "$VOCAB/.complete"
fi
ls "$VOCAB" >&2
# The official OpenAI Python client, for the gateway's client compatibility test.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  echo "installing openai==3.57.0 from PyPI into $VENV ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check openai==3.57.0 >&2
fi
if ! "$VENV/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null; then
  echo "installing kubernetes-validate==1.37.0 from PyPI into $VENV ..." >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 >&2
fi
# A real Prometheus server and promtool (deploy/ tests).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing Debian's prometheus package ..." >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package may start a system service where an init system runs; the tests start
  # their own server on a free port.
  $SUDO systemctl stop prometheus 2>/dev/null || true
fi
# NVRTC (libnvrtc.so.13) from PyPI: the kernel-compilation test runs without a GPU.
NVRTC="$CACHE/nvrtc"
if [ ! -f "$NVRTC/.complete" ]; then
  mkdir -p "$NVRTC"
  echo "fetching nvidia-cuda-nvrtc==13.0.88 from PyPI (NVRTC for the kernel compile test) ..." >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$NVRTC/whl" nvidia-cuda-nvrtc==13.0.88 >&2
  python3 -c "import zipfile,sys,glob; zipfile.ZipFile(glob.glob(sys.argv[1]+'/whl/*.whl')[0]).extractall(sys.argv[1])" "$NVRTC"
  rm -rf "$NVRTC/whl"
  touch "$NVRTC/.complete"
fi
