#!/usr/bin/env bash
# The whole check, as CI runs it: install (idempotent), lint, then the test suite against real
# peers. Extra arguments go to pytest:  scripts/test.sh -k tus -x
# Exits non-zero if lint or any test fails, or if no test was collected.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install.sh

printf '\n==> ruff check .\n'
ruff_status=0
.venv/bin/ruff check . || ruff_status=$?

printf '\n==> pytest %s\n' "$*"
pytest_status=0
.venv/bin/python -m pytest -q -ra "$@" || pytest_status=$?

if [ "$pytest_status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 5
fi
if [ "$pytest_status" -ne 0 ]; then
    exit "$pytest_status"
fi
if [ "$ruff_status" -ne 0 ]; then
    echo "test.sh: tests passed but ruff check failed" >&2
    exit "$ruff_status"
fi
echo "test.sh: all green"
