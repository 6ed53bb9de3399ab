# Sourced by the launch/*.sh launchers: repository root, interpreter, config argument,
# process count. Sets ROOT, PY, BIN, CONFIG (first argument if it is not an option;
# it is shifted off the caller's arguments), NGPU, NPROC (default: every GPU, else 2)
# and puts the repository on PYTHONPATH.
# The interpreter: $PY when set (an error if it cannot be run), else the python of the
# venv that launch/setup.sh made ($VENV, default .venv, relative to the repository), else
# python3 from PATH (said on stderr).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PY:-}" ]; then
    if ! command -v "$PY" >/dev/null 2>&1; then
        echo "[launch] PY=$PY is not an executable interpreter" >&2
        exit 2
    fi
    PY="$(command -v "$PY")"
else
    case "${VENV:-.venv}" in
        /*) PY="${VENV:-.venv}/bin/python" ;;
        *)  PY="$ROOT/${VENV:-.venv}/bin/python" ;;
    esac
    if [ ! -x "$PY" ]; then
        if [ -n "${VENV:-}" ]; then
            echo "[launch] VENV=$VENV has no bin/python (make it with: VENV=$VENV bash launch/setup.sh)" >&2
            exit 2
        fi
        echo "[launch] no $PY (bash launch/setup.sh makes it): using python3 from PATH" >&2
        PY=python3
    fi
fi
BIN="$(dirname "$PY")"
CONFIG="configs/tiny.toml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG="$1"; shift; fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ -z "${NPROC:-}" ]; then
    if [ "$NGPU" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
fi
echo "[launch] $NPROC process(es) per node on $([ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s)" || echo CPU), config $CONFIG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# preflight WORLD [args...]: check the configuration (and a --resume checkpoint) in one
# process, for WORLD processes, before the launcher starts any: a bad preset, --set or
# checkpoint stops here with its one-line message on stderr and exit code 2, instead of
# once per rank inside the launcher's output. With --dry-run among the arguments this
# check is the whole job: it prints the plan for WORLD processes and exits.
preflight() {
    local world="$1" arg err rc=0
    shift
    local wargs=()
    if [ -n "$world" ]; then wargs=(--world-size "$world"); fi
    for arg in "$@"; do
        if [ "$arg" = "--dry-run" ]; then
            exec "$PY" launch/train.py --config "$CONFIG" "$@" "${wargs[@]}"
        fi
    done
    err="$("$PY" launch/train.py --config "$CONFIG" "$@" --dry-run "${wargs[@]}" 2>&1 >/dev/null)" \
        || rc=$?
    if [ "$rc" -eq 2 ] && grep -q '^\[train\] configuration error' <<<"$err"; then
        grep -m1 '^\[train\] configuration error' <<<"$err" >&2
        exit 2
    elif [ "$rc" -ne 0 ]; then
        printf '%s\n' "$err" >&2
        exit "$rc"
    fi
}
