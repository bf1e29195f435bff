#!/usr/bin/env bash
# Installs and starts what ditfleet needs on a Debian/Ubuntu machine, idempotently:
#   - RabbitMQ and Redis (apt, if absent), started if not listening on 127.0.0.1:5672 / :6379;
#   - the Python venv .venv with torch==2.11.0 from PyPI, which provides libtorch for the engine
#     (the PyPI wheel is the CUDA 13.0 build; the same C++ ABI as the GPU machines);
#   - the Python venv .test-venv with moto[server] (a local S3-compatible server for the result
#     store tests) and the openssl CLI (private CAs for the TLS tests);
#   - checks for the Rust toolchain and a C/C++ compiler.
# Used by `make demo` and `make test`. Safe to run repeatedly; prints what it does.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf 'setup: %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

pip_tmp() { rm -rf "$1"; mkdir -p "$1"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 tries=${3:-120}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$what did not start listening on 127.0.0.1:$port"
  return 1
}

# --- toolchains -------------------------------------------------------------------------------
command -v cargo >/dev/null || { log "cargo is missing: install the Rust toolchain (rustup) first"; exit 1; }
command -v cc >/dev/null && command -v c++ >/dev/null || apt_install build-essential
command -v python3 >/dev/null || apt_install python3 python3-venv python3-pip
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv python3-pip

# --- RabbitMQ ---------------------------------------------------------------------------------
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 RabbitMQ 240
  $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi

# --- Redis ------------------------------------------------------------------------------------
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 6379 Redis
fi

# --- libtorch through the pip venv --------------------------------------------------------------
want_torch=2.11.0
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$want_torch' else 1)" 2>/dev/null; then
  [ -x .venv/bin/python ] || { log "creating .venv"; python3 -m venv .venv; }
  log "installing torch==$want_torch into .venv (about 4.6 GB with its CUDA libraries; a few minutes on first run)"
  # pip buffers each download in $TMPDIR and copies it into its cache: on a machine whose /tmp
  # is a small tmpfs the 4.6 GB of wheels fail with ENOSPC. Download beside the venv, uncached.
  pip_tmp "$root/.venv/.pip-tmp"
  TMPDIR="$root/.venv/.pip-tmp" .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check "torch==$want_torch"
  rm -rf "$root/.venv/.pip-tmp"
fi
# The engine's ATen shim (worker/engine/csrc) includes CUDA headers; the torch wheel ships
# cuda_runtime_api.h but not the crt/ headers it includes (166 kB wheel).
want_crt=13.0.88
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('nvidia-cuda-crt') == '$want_crt' else 1)" 2>/dev/null; then
  log "installing nvidia-cuda-crt==$want_crt into .venv (CUDA headers for the engine's shim)"
  .venv/bin/pip install -q --disable-pip-version-check "nvidia-cuda-crt==$want_crt"
fi
# The FP8 attention (worker/engine/csrc/cudnn_fp8_attention.cpp) builds cuDNN graphs with the
# header-only cudnn-frontend; only its headers are used (--no-deps: the wheel's Python extras pull
# CUTLASS DSL and more, which the engine does not need). Its cuDNN is the torch wheel's.
want_fe=1.32.0
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('nvidia-cudnn-frontend') == '$want_fe' else 1)" 2>/dev/null; then
  log "installing nvidia-cudnn-frontend==$want_fe headers into .venv (cuDNN graph API for the FP8 attention)"
  .venv/bin/pip install -q --no-deps --disable-pip-version-check "nvidia-cudnn-frontend==$want_fe"
fi
# cuda_fp16.h, which the frontend includes, includes <nv/target> from CCCL (18 MB of headers).
want_cccl=13.0.85
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('nvidia-cuda-cccl') == '$want_cccl' else 1)" 2>/dev/null; then
  log "installing nvidia-cuda-cccl==$want_cccl headers into .venv (for the cudnn-frontend)"
  .venv/bin/pip install -q --no-deps --disable-pip-version-check "nvidia-cuda-cccl==$want_cccl"
fi
# --- test helpers: S3-compatible server (moto) and openssl ------------------------------------
want_moto=5.2.1
if ! .test-venv/bin/python -c "import moto, sys; sys.exit(0 if moto.__version__ == '$want_moto' else 1)" 2>/dev/null \
   || [ ! -x .test-venv/bin/moto_server ]; then
  [ -x .test-venv/bin/python ] || { log "creating .test-venv"; python3 -m venv .test-venv; }
  log "installing moto[server]==$want_moto into .test-venv (S3-compatible server for the tests)"
  .test-venv/bin/pip install -q --disable-pip-version-check "moto[server]==$want_moto"
fi
command -v openssl >/dev/null || apt_install openssl

log "ready: RabbitMQ 127.0.0.1:5672, Redis 127.0.0.1:6379, libtorch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
