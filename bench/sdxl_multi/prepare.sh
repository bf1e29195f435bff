#!/usr/bin/env bash
# On the CPU machine: builds what bench/sdxl_multi/run.sh carries to the multi-GPU machine (both
# folders are git-ignored by .gitignore):
#   .gpu/sdxl_multi  release build of worker/engine/examples/sdxl_multi.rs, stripped;
#   .whl/            the diffusers 0.42.1 set of bench/sdxl_1gpu/prepare.sh (diffusers, huggingface_hub
#                    2.4.0 with httpx2, httpcore2, truststore; safetensors, importlib_metadata, zipp;
#                    transformers 5.23.0 with tokenizers and regex), plus xfuser 0.7.0 and what it
#                    imports that the GPU image (torch 2.11 at /opt/torch/.venv, Python 3.12) lacks:
#                    yunchang 0.6.4 and distvae 0.1.0 (its Requires-Dist, not in the image), einops
#                    (imported by xfuser.core.distributed). The image already has its other
#                    requirements (accelerate, numpy, PyYAML, sentencepiece; see
#                    .library/device/KINDS.md's pip list); beautifulsoup4, av and peft are
#                    imported only on other models' paths. --no-deps, every wheel named here.
# Then one device call per kind (see docs/benchmarks.md, "SDXL across 2, 4 and 8 GPUs"), carry
# [".gpu", ".whl"]:
#   OUT=$OUT bash bench/sdxl_multi/run.sh
# Env: SKIP_BUILD=1, SKIP_WHEELS=1, VENV (default .venv), CARGO_TARGET_DIR (default target), CARGO_JOBS.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PATH=${VENV:-$PWD/.venv}/bin:$PATH LIBTORCH_USE_PYTORCH=1  # the venv with torch 2.11 (make setup)
{ git check-ignore -q .gpu && git check-ignore -q .whl; } || { echo ".gpu and .whl must be git-ignored (.gitignore lists them)" >&2; exit 1; }
if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release -p ditfleet-engine --features bench --example sdxl_multi ${CARGO_JOBS:+-j $CARGO_JOBS}
  mkdir -p .gpu
  cp "${CARGO_TARGET_DIR:-target}/release/examples/sdxl_multi" .gpu/sdxl_multi
  strip .gpu/sdxl_multi
  ldd .gpu/sdxl_multi | grep -q libtorch_cuda \
    || { echo "sdxl_multi does not link libtorch_cuda: it would not see the GPUs" >&2; exit 1; }
fi
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  mkdir -p .whl
  rm -f .whl/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
    safetensors==0.8.0 importlib_metadata==10.2.0 zipp==4.1.2 \
    transformers==5.23.0 tokenizers==0.23.3 regex==2026.12.2 \
    xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0 einops==0.8.2
fi
ls -la .gpu .whl || true
# The device call carries at most 64 MiB: the working tree (tracked and untracked files) with these.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .gpu .whl | tail -1 | cut -f1)
echo "working tree $((tree / 1048576)) MiB + .gpu/.whl $((carried / 1048576)) MiB = $(((tree + carried) / 1048576)) MiB (limit 64)"
(( tree + carried < 64 * 1048576 )) || { echo "over the 64 MiB a device call carries: carry less" >&2; exit 1; }
