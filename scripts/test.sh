#!/usr/bin/env bash
# The whole check, as CI runs it: install (idempotent), ruff, mypy, then the test suite against
# real peers with coverage (the gateway subprocesses the e2e tests start are measured too:
# [tool.coverage.run] patch = subprocess). Extra arguments go to pytest:  scripts/test.sh -k tus -x
#
# Gates (each one fails the run): ruff finds nothing; mypy finds no error (config in
# pyproject.toml: strict on config/upstream/http/dicom/host/metrics); every test passes; and, on
# a full run (no arguments), coverage is at least COVERAGE_FLOOR percent (README "Tests").
# With arguments the coverage report is printed but not held to the floor (a subset covers less).
#
# Two pytest-xdist workers (PYTEST_WORKERS=0 runs serially): each worker has its own session
# Orthanc and peers on free ports. Measured on this 2-core machine while other jobs shared it,
# 3 runs each of a 156-test e2e subset: 137/129/136 s serial, 93/116/103 s with -n 2 (median
# -24 %), all green; the full suite with coverage took 8m55 with -n 2 against 13m44 serially.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Measured on a full run (see README): lower it only with a reason, raise it when tests are added.
COVERAGE_FLOOR=84

bash scripts/install.sh

printf '\n==> ruff check .\n'
ruff_status=0
.venv/bin/ruff check . || ruff_status=$?

printf '\n==> mypy (pyproject.toml [tool.mypy])\n'
mypy_status=0
.venv/bin/mypy || mypy_status=$?

floor=0
if [ "$#" -eq 0 ]; then
    floor="$COVERAGE_FLOOR"
fi
workers="${PYTEST_WORKERS:-2}"
printf '\n==> pytest -n %s %s (coverage floor %s%%)\n' "$workers" "$*" "$floor"
pytest_status=0
.venv/bin/python -m pytest -q -ra -n "$workers" --cov --cov-report=term --cov-fail-under="$floor" "$@" \
    || pytest_status=$?

if [ "$pytest_status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 5
fi
if [ "$pytest_status" -ne 0 ]; then
    echo "test.sh: pytest failed (a test, or coverage under ${floor}%: see above)" >&2
    exit "$pytest_status"
fi
if [ "$ruff_status" -ne 0 ]; then
    echo "test.sh: tests passed but ruff check failed" >&2
    exit "$ruff_status"
fi
if [ "$mypy_status" -ne 0 ]; then
    echo "test.sh: tests passed but mypy found errors" >&2
    exit "$mypy_status"
fi
echo "test.sh: all green"
