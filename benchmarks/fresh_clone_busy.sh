#!/bin/bash
# Issue 8's check by hand: `make demo` on 3 fresh clones in a row, each with two CPU hogs beside it
# (both cores busy), nothing exported (env -i). One line per run goes to the summary file.
#   [RUNS=3] benchmarks/fresh_clone_busy.sh [repo] [summary file]
# (tests/test_fresh_clone.py runs the first stages the same way in `make test`.)
REPO=${1:-$(git rev-parse --show-toplevel)}
SUMMARY=${2:-/tmp/fresh_clone_busy.txt}
REV=$(git -C "$REPO" rev-parse --short HEAD)
for i in $(seq "${RUNS:-3}"); do
  d=/tmp/fresh_busy_$i; rm -rf "$d"
  git clone -q "$REPO" "$d"
  python3 -c 'while True: pass' & H1=$!
  python3 -c 'while True: pass' & H2=$!
  start=$(date +%s)
  (cd "$d" && env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" make demo > "/tmp/fresh_busy_demo_$i.log" 2>&1); rc=$?
  end=$(date +%s)
  kill $H1 $H2
  st=$(cd "$d" && .venv/bin/dvc status 2>&1 | tail -1)
  left=$(ps aux | grep "$d" | grep -v grep | wc -l)
  echo "run $i rev $REV rc $rc wall $((end-start)) s; dvc status: $st; processes left from the clone: $left; finished $(date -u +%H:%M)" >> "$SUMMARY"
  rm -rf "$d"
done
