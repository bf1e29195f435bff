#!/usr/bin/env bash
# On the CPU machine: builds what bench/sdxl_1gpu/run.sh carries to the GPU machine (both folders are
# git-ignored):
#   .gpu/sdxl_bench  release build of worker/engine/examples/sdxl_bench.rs, stripped;
#   .whl/            diffusers 0.42.1 and what it imports that the GPU image (torch 2.11 at
#                    /opt/torch/.venv) may lack or hold too old: huggingface_hub 2.4.0 with its HTTP
#                    stack (httpx2, httpcore2, truststore), safetensors, importlib_metadata, zipp; and
#                    transformers 5.23.0 with tokenizers and regex for the baseline's text encoders.
#                    Python 3.12, manylinux x86_64, --no-deps (each dependency is named here).
# Then: device run (kind nvidia-h200), carry [".gpu", ".whl"]:
#   OUT=$OUT BUDGET_S=540 bash bench/sdxl_1gpu/run.sh
# Env: SKIP_BUILD=1, SKIP_WHEELS=1, CARGO_TARGET_DIR (default target).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PATH=$PWD/.venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release -p ditfleet-engine --features bench --example sdxl_bench
  mkdir -p .gpu
  cp "${CARGO_TARGET_DIR:-target}/release/examples/sdxl_bench" .gpu/sdxl_bench
  strip .gpu/sdxl_bench
  ldd .gpu/sdxl_bench | grep -q libtorch_cuda \
    || { echo "sdxl_bench does not link libtorch_cuda: it would not see the GPU" >&2; exit 1; }
fi
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  mkdir -p .whl
  rm -f .whl/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
    safetensors==0.8.0 importlib_metadata==10.2.0 zipp==4.1.2 \
    transformers==5.23.0 tokenizers==0.23.3 regex==2026.12.2
fi
ls -la .gpu .whl
du -ch .gpu .whl | tail -1   # the device call carries at most 64 MiB with the working tree
