#!/usr/bin/env bash
# Service benchmark on the demo bundle: search/predict latency and throughput at 1 and 16 clients,
# with and without adaptive batching, plus the in-process comparison. Results as JSON in
# reports/service_benchmark/ (summarised in BENCHMARKS.md).
#
#   benchmarks/service_benchmark.sh [BUNDLE_DIR]      # default artifacts/bundle (made by `make demo`)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${1:-$ROOT/artifacts/bundle}"
OUT="$ROOT/reports/service_benchmark"
PY="$ROOT/.venv/bin/python"
mkdir -p "$OUT"
NOBATCH_PARAMS="$(mktemp --suffix=.yaml)"
sed 's/^\(\s*batch_max_size:\).*/\1 1/' "$ROOT/params.yaml" > "$NOBATCH_PARAMS"

run() {  # name, extra env for the server, load_test args...
  local name="$1" env_params="$2"; shift 2
  MARKETPLACE_PARAMS="$env_params" "$PY" "$ROOT/benchmarks/load_test.py" --serve-bundle "$BUNDLE" \
    --bundle "$BUNDLE" --json-out "$OUT/$name.json" "$@" | tail -n 12
}

run batched_c16_mixed "" -n 10000 -c 16 --mix search=0.7,predict=0.3 --in-process 300
run batched_c1_search "" -n 1000 -c 1 --mix search=1 --in-process 0
run unbatched_c16_search "$NOBATCH_PARAMS" -n 3000 -c 16 --mix search=1 --in-process 0
run batched_c16_search "" -n 3000 -c 16 --mix search=1 --in-process 0
run unbatched_c1_search "$NOBATCH_PARAMS" -n 1000 -c 1 --mix search=1 --in-process 0
rm -f "$NOBATCH_PARAMS"
