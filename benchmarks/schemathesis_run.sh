#!/usr/bin/env bash
# Fuzz a running marketplace service against its own OpenAPI schema (/docs.json) with schemathesis:
# every generated request (valid and invalid) must get an answer that is not a server error (5xx).
#
#   benchmarks/schemathesis_run.sh [BASE_URL]        # default: $SERVICE_URL or http://127.0.0.1:3000
#
# Start the service first, e.g.
#   MARKETPLACE_BUNDLE_DIR=artifacts/bundle bentoml serve service.service:MarketplaceSearch --port 3000
# Environment knobs: MAX_EXAMPLES (default 50 per operation), MAX_TIME (seconds, optional budget),
# WORKERS (default 1), SEED (optional), REPORT_DIR (default reports/schemathesis), EXTRA_CHECKS
# (e.g. "response_headers_conformance"; comma-separated, added to not_a_server_error).
# Exit code: 0 when no check failed, non-zero otherwise (schemathesis' own code), 2 when the
# service is not reachable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${1:-${SERVICE_URL:-http://127.0.0.1:3000}}"
URL="${URL%/}"
MAX_EXAMPLES="${MAX_EXAMPLES:-50}"
WORKERS="${WORKERS:-1}"
REPORT_DIR="${REPORT_DIR:-$ROOT/reports/schemathesis}"

if [[ -x "$ROOT/.venv/bin/schemathesis" ]]; then
  ST="$ROOT/.venv/bin/schemathesis"
elif command -v schemathesis >/dev/null 2>&1; then
  ST="$(command -v schemathesis)"
else
  echo "schemathesis is not installed (pip install -e '.[dev]')" >&2
  exit 2
fi

if ! curl -fsS -o /dev/null --max-time 10 "$URL/readyz"; then
  echo "the service is not ready at $URL (GET /readyz failed); start it first" >&2
  exit 2
fi

CHECKS="not_a_server_error"
if [[ -n "${EXTRA_CHECKS:-}" ]]; then
  CHECKS="$CHECKS,$EXTRA_CHECKS"
fi

mkdir -p "$REPORT_DIR"
args=(
  run "$URL/docs.json"
  --url "$URL"
  --checks "$CHECKS"
  --phases examples,coverage,fuzzing
  --max-examples "$MAX_EXAMPLES"
  --workers "$WORKERS"
  --request-timeout 60
  --generation-database none
  --suppress-health-check too_slow,data_too_large
  --report junit
  --report-dir "$REPORT_DIR"
  --no-color
)
if [[ -n "${MAX_TIME:-}" ]]; then
  args+=(--max-time "$MAX_TIME")
fi
if [[ -n "${SEED:-}" ]]; then
  args+=(--seed "$SEED")
fi

echo "schemathesis: $URL/docs.json, checks=$CHECKS, max-examples=$MAX_EXAMPLES, report in $REPORT_DIR" >&2
export SCHEMATHESIS_HOOKS="${SCHEMATHESIS_HOOKS:-}"
cd "$ROOT"
exec "$ST" "${args[@]}"
