#!/usr/bin/env bash
# moeframe developer entry point.
#
#   ./dev.sh run [CONFIG] [ARGS...]   set up .venv, then `moeframe run CONFIG` (default: qwen3-moe)
#   ./dev.sh test [PYTEST ARGS...]    set up .venv, then run the whole test suite
#   ./dev.sh bench [ARGS...]          set up .venv (the bench and peers extras included), then run the
#                                     benchmark of docs/performance.md and regenerate its tables and plot
#   ./dev.sh setup                    only set up .venv
#
# Set-up: a virtual environment in .venv (or $MOEFRAME_VENV) with the core (and its test,
# bench and peers extras: the tests compare with transformers' MoE experts too) and every
# plugin under plugins/ installed editable.  Where no NVIDIA GPU is present it installs a
# CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${MOEFRAME_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MOEFRAME_TORCH_VERSION:-2.13.0}"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if have_gpu; then
      log "GPU found: installing torch (CUDA build)"
      "${pip[@]}" torch
    else
      log "no GPU: installing the CPU build of torch $TORCH_VERSION"
      "${pip[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  local stamp="$VENV/.moeframe-installed"
  local newest
  newest=$(ls -t pyproject.toml plugins/*/pyproject.toml | head -n 1)
  if [ ! -f "$stamp" ] || [ "$newest" -nt "$stamp" ]; then
    log "installing moeframe and its plugins (editable)"
    local plugins=()
    for p in plugins/*/; do
      [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p")
    done
    "${pip[@]}" -e ".[test,bench,peers]" "${plugins[@]}"
    touch "$stamp"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup ;;
  run)
    setup
    config="qwen3-moe"
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then config="$1"; shift; fi
    exec "$VENV/bin/moeframe" run "$config" "$@" ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    setup
    exec "$VENV/bin/moeframe" bench docs/bench-e64.toml --dtype float32,bfloat16 \
      --tokens 1,16,64,256,512,1024,4096 --overhead --memory \
      --json docs/performance.json --plot docs/performance.png --markdown docs/performance.md "$@" ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2 ;;
esac
