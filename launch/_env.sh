# Sourced by the launch/*.sh launchers: repository root, interpreter, config argument,
# process count. Sets ROOT, PY, BIN, CONFIG (first argument if it is not an option;
# it is shifted off the caller's arguments), NGPU, NPROC (default: every GPU, else 2)
# and puts the repository on PYTHONPATH.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
CONFIG="configs/tiny.toml"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG="$1"; shift; fi
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ -z "${NPROC:-}" ]; then
    if [ "$NGPU" -gt 0 ]; then NPROC="$NGPU"; else NPROC=2; fi
fi
echo "[launch] $NPROC process(es) per node on $([ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s)" || echo CPU), config $CONFIG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
