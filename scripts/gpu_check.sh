#!/usr/bin/env bash
# One prepared GPU check: the gpu-marked tests and a real-size bfloat16 benchmark of phi4flash (prefill,
# decode, the paper's setting against transformers' Phi3, int8/int4), printed as one markdown table and
# written to $OUT/gpu_check.md when OUT is set. Under 8 minutes on one H200. The work is in
# benchmarks/gpu_check.py; this script finds a Python whose torch sees the GPU and makes phi4flash's
# imports work there, installing what is missing from wheels in ${PHI4FLASH_WHEELS:-.whl}, then from the
# package registry if one answers (none is assumed), and says in the table what it could not install.
#
#   bash scripts/gpu_check.sh [options of benchmarks/gpu_check.py]   # on the GPU machine, from any folder
#   bash scripts/gpu_check.sh --tiny                                  # the same at tiny sizes (a minute)
#   bash scripts/gpu_check.sh --fetch-wheels                          # here: wheels the GPU machine lacks -> .whl/
#
# Environment: PYTHON (the interpreter to use), GPU_CHECK_SECONDS (the whole run's limit, default 460),
# PHI4FLASH_WHEELS (a folder of wheels to install from), WHEEL_PYTHON (--fetch-wheels: 3.12).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
WHEELS=${PHI4FLASH_WHEELS:-$ROOT/.whl}
LIMIT=${GPU_CHECK_SECONDS:-460}
# module:pip-name:what-needs-it. phi4flash's own imports, then pytest (the tests) and transformers (the baseline).
REQUIRED="numpy:numpy:phi4flash safetensors:safetensors:phi4flash tokenizers:tokenizers:phi4flash
huggingface_hub:huggingface_hub:phi4flash jinja2:jinja2:phi4flash tqdm:tqdm:phi4flash
llguidance:llguidance>=1.9,<2:phi4flash pytest:pytest:tests transformers:transformers>=4.46:baseline"
OPTIONAL="mamba_ssm:mamba-ssm causal_conv1d:causal-conv1d"  # CUDA kernels: from wheels only (they build for long)

if [ "${1:-}" = "--fetch-wheels" ]; then
  # Run where a registry answers: the packages the GPU image lacks (llguidance), as wheels for its Python.
  shift
  platforms=$(for n in 17 24 27 28 31 34 35 39; do printf -- '--platform manylinux_2_%s_x86_64 ' "$n"; done)
  # shellcheck disable=SC2086 # the platform flags are meant to split
  exec "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp $platforms -d "$WHEELS" "llguidance>=1.9,<2" "$@"
fi

REPORT=$(mktemp)
trap 'rm -f "$REPORT"' EXIT
note() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$REPORT"; echo "gpu_check.sh: $1: $2, $3: $4" >&2; }
sees_gpu() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
missing() {  # the modules among "$@" that $PY cannot import (one interpreter start for all)
  "$PY" - "$@" <<'PYEOF' 2>/dev/null
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name)
PYEOF
}
REGISTRY=unknown  # "unreachable" after the first failed registry install, so that the rest do not wait for it
install() {  # pip requirement -> 0 when pip installed it; where from in $FROM, why not in $WHY
  FROM="" WHY=""
  if ! "$PY" -m pip --version >/dev/null 2>&1; then WHY="no pip in $PY"; return 1; fi
  if ls "$WHEELS"/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$1" >/dev/null 2>&1; then
    FROM="wheels in $WHEELS"; return 0
  fi
  if [ "$REGISTRY" != unreachable ] && timeout 300 "$PY" -m pip install -q --timeout 10 --retries 0 "$1" >/dev/null 2>&1; then
    FROM="the package registry"; return 0
  fi
  REGISTRY=unreachable
  WHY="not in $WHEELS and not from the registry (where one answers: bash scripts/gpu_check.sh --fetch-wheels, then carry .whl)"
  return 1
}

# The interpreter: $PYTHON if given; else the first of the project's .venv and python3 whose torch sees a
# GPU, else the first that has torch at all (the table then says there is no GPU).
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY="" fallback=""
  for candidate in "$ROOT/.venv/bin/python" python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if sees_gpu "$candidate"; then PY=$candidate; break; fi
    [ -z "$fallback" ] && has_torch "$candidate" && fallback=$candidate
  done
  PY=${PY:-${fallback:-python3}}
fi
if ! has_torch "$PY"; then
  if command -v nvidia-smi >/dev/null 2>&1 && install torch && has_torch "$PY"; then
    note "torch" ok "installed" "from $FROM into $PY"
  else
    note "torch" failed "missing" "$PY has no torch and none could be installed: ${WHY:-no nvidia-smi, no GPU driver}"
    printf '\nphi4flash GPU check: nothing could run\n\n| section | what | status | result | detail |\n|---|---|---|---|---|\n'
    awk -F'\t' '{ printf "| environment | %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$REPORT"
    exit 1
  fi
fi
modules=""
for entry in $REQUIRED; do modules="$modules ${entry%%:*}"; done
# shellcheck disable=SC2086 # one word per module
for module in $(missing $modules); do
  entry=$(printf '%s\n' $REQUIRED | grep "^$module:")
  IFS=: read -r _ package needed_by <<<"$entry"
  if install "$package" && [ -z "$(missing "$module")" ]; then
    note "$package" ok "installed" "from $FROM"
  else
    note "$package" failed "missing" "needed by $needed_by; ${WHY:-installed, but still not importable}"
  fi
done
for entry in $OPTIONAL; do
  IFS=: read -r module package <<<"$entry"
  # absent is normal (phi4flash then runs its pure path, the environment rows name the kernels found)
  if [ -n "$(missing "$module")" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 \
     && "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$package" >/dev/null 2>&1; then
    note "$package" ok "installed" "from wheels in $WHEELS"
  fi
done

# phi4flash from this checkout, installed or not; the Python part gets what is left of the limit.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=$((LIMIT - SECONDS - 20))
[ "$budget" -ge 30 ] || budget=30
echo "gpu_check.sh: $PY, ${budget} s for the check" >&2
timeout -s TERM -k 20 $((budget + 10)) "$PY" benchmarks/gpu_check.py --budget "$budget" --environment-report "$REPORT" "$@"
