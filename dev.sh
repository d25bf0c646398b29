#!/usr/bin/env bash
# moeframe developer entry point.
#
#   ./dev.sh run [CONFIG] [ARGS...]   set up .venv (the core and the plugins), then `moeframe run CONFIG`
#                                     (default: qwen3-moe, 128 tokens, 5 timed repeats)
#   ./dev.sh test [PYTEST ARGS...]    set up .venv with the test, transformers, plot, peers and cross extras, then run the tests
#   ./dev.sh bench [ARGS...]          set up .venv with moeframe-bench's plot and peers extras, then run the
#                                     benchmark of docs/performance.md and regenerate its tables and plot
#   ./dev.sh docs                     set up .venv with the docs extra, then build the documentation site
#                                     (mkdocs --strict: a broken link or API reference fails) into site/
#   ./dev.sh lint                     set up .venv with the lint extra (and what mypy needs to see every
#                                     import), then ruff check, ruff format --check and mypy on moeframe/ and plugins/
#   ./dev.sh setup                    set up .venv with every extra (what `test` and `bench` need)
#
# Set-up: a virtual environment in .venv (or $MOEFRAME_VENV) with the core and every plugin
# under plugins/ installed editable, plus the extras the command needs, each installed for
# the distributions that declare it (moeframe's test: pytest, hypothesis; transformers: the
# integration, whose tests run in `test`; moeframe-bench's plot: matplotlib, and peers:
# transformers, which the benchmark and its tests compare with).
# Where no NVIDIA GPU is present it installs a CPU build of torch first, so that nothing
# pulls a multi-GB CUDA build.  Each step says what it installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${MOEFRAME_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MOEFRAME_TORCH_VERSION:-2.13.0}"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# the extras a pyproject.toml declares, one a line
declared_extras() {
  awk '/^\[/ { s = ($0 == "[project.optional-dependencies]"); next }
       s && /^[A-Za-z0-9_.-]+[ \t]*=/ { sub(/[ \t]*=.*/, ""); print }' "$1"
}

# pick WANTED PYPROJECT: the extras of the comma-separated WANTED that PYPROJECT declares
pick() {
  local e out=""
  for e in $(declared_extras "$2"); do
    case ",$1," in *",$e,"*) out="$out,$e" ;; esac
  done
  printf '%s' "${out#,}"
}

# setup EXTRAS: EXTRAS is a comma-separated list of extras ("" for none), each installed
# for the core and the plugins that declare it.  The stamp file records the extras
# installed; a later call installs only what is missing.
setup() {
  local want="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    log "step 1/3: creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    if have_gpu; then
      log "step 2/3: GPU found: installing torch (CUDA build, a few GB; this takes a while)"
      "${pip[@]}" torch
    else
      log "step 2/3: no GPU: installing the CPU build of torch $TORCH_VERSION (about 200 MB)"
      "${pip[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "${pip[@]}" "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  local stamp="$VENV/.moeframe-installed"
  local have="" newest missing="" e
  if [ -f "$stamp" ]; then
    have=$(cat "$stamp")
    [ -s "$stamp" ] || have="test,bench,peers"   # an empty stamp: an older dev.sh installed every extra
  fi
  for e in ${want//,/ }; do
    case ",$have," in *",$e,"*) ;; *) missing="$missing,$e" ;; esac
  done
  newest=$(ls -t pyproject.toml plugins/*/pyproject.toml | head -n 1)
  if [ ! -f "$stamp" ] || [ -n "$missing" ] || [ "$newest" -nt "$stamp" ]; then
    local all
    all=$(printf '%s' "$have$missing" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
    local plugins=() names=() core p x
    core=$(pick "$all" pyproject.toml)
    for p in plugins/*/; do
      p="${p%/}"
      if [ -f "$p/pyproject.toml" ]; then
        x=$(pick "$all" "$p/pyproject.toml")
        plugins+=(-e "$p${x:+[$x]}"); names+=("$(basename "$p")${x:+[$x]}")
      fi
    done
    log "step 3/3: installing moeframe (editable${core:+, extras: $core}) and the plugins ${names[*]} (triton among their dependencies)"
    "${pip[@]}" -e ".${core:+[$core]}" "${plugins[@]}"
    printf '%s' "$all" > "$stamp"
  fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup)
    setup "test,transformers,plot,peers,cross,lint" ;;
  run)
    setup ""
    config="qwen3-moe"
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then config="$1"; shift; fi
    log "running: moeframe run $config $*"
    exec "$VENV/bin/moeframe" run "$config" "$@" ;;
  test)
    setup "test,transformers,plot,peers,cross"  # cross: zig cc, for the aarch64 core's tests
    # one pytest worker per core (pytest-xdist); MOEFRAME_TEST_WORKERS=0 runs in one process
    log "running: pytest -n ${MOEFRAME_TEST_WORKERS:-auto} $*"
    exec "$VENV/bin/python" -m pytest -n "${MOEFRAME_TEST_WORKERS:-auto}" "$@" ;;
  docs)
    setup "docs"
    log "running: mkdocs build --strict"
    exec "$VENV/bin/python" -m mkdocs build --strict "$@" ;;
  lint)
    # mypy reads the types of every import: the extras the tests use, plus the lint tools
    setup "test,transformers,plot,peers,lint"
    log "running: ruff check, ruff format --check, mypy (moeframe/ and plugins/)"
    # all three run, so that one pass shows every finding; any failure fails the command
    status=0
    "$VENV/bin/ruff" check moeframe plugins || status=1
    "$VENV/bin/ruff" format --check moeframe plugins || status=1
    "$VENV/bin/mypy" || status=1
    exit "$status" ;;
  bench)
    setup "plot,peers"
    exec "$VENV/bin/moeframe" bench docs/bench-e64.toml --dtype float32,bfloat16 \
      --tokens 1,16,64,256,512,1024,4096 --overhead --memory \
      --json docs/performance.json --plot docs/performance.png --markdown docs/performance.md "$@" ;;
  *)
    sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    exit 2 ;;
esac
