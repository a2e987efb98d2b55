#!/bin/bash
# One synthetic run of the checkout TREE with the embedded store, into a fresh data directory that
# is removed afterwards: a command for farm-bench to pair two checkouts (before/after a change).
#
#   git worktree add /tmp/base HEAD~1 && (cd /tmp/base && ./tapeflow --help >/dev/null)
#   farm-bench -n 5 --timeout 900 --vs "bench/pair_run.sh /tmp/base 2" -- bench/pair_run.sh . 2
#
# usage: bench/pair_run.sh TREE [PROCESSES] [SYMBOLS] [HOURS]   (defaults: 1 process, 32 symbols, 3 h)
set -eu
tree=$(cd "$1" && pwd); procs=${2:-1}; n=${3:-32}; hours=${4:-3}
symbols=$(python3 -c "print(','.join(f'S{i:02d}/USDT:USDT' for i in range($n)))")
data=$(mktemp -d /tmp/tapeflow-pair.XXXXXX)
trap 'rm -rf "$data"' EXIT
cd "$tree"
.venv/bin/python -m cli.main run --quiet --data-dir "$data" --symbols "$symbols" --hours "$hours" --rate 4 \
  --train-split 0 --processes "$procs" > /dev/null
