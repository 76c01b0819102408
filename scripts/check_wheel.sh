#!/usr/bin/env bash
# The packaging test, end to end: build the wheel, install it into a fresh venv outside the
# checkout, write a minimal appsettings.json (free ports, a scripts folder with a main.lua) in
# another temp folder, start `dicomproxy serve` there and wait until /dicomproxy/health answers
# 200 and main.lua's hook ran; then stop it. tests/test_packaging.py checks what pyproject.toml
# declares; this proves that what it declares makes a gateway that starts.
#
#   scripts/check_wheel.sh            (after scripts/install.sh: it uses .venv to build)
#   CHECK_WHEEL_KEEP=1 scripts/...    keep the temp folder (venv, config, log) for a look
#
# Exits non-zero, with the gateway's log tail, if any step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
WAIT_SECONDS="${CHECK_WHEEL_WAIT:-60}"
[ -x "$PY" ] || { echo "check_wheel.sh: $PY is missing: run scripts/install.sh first" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dicomproxy-wheel.XXXXXX")"
case "$WORK" in "$ROOT"/*) echo "check_wheel.sh: the temp folder $WORK is inside the checkout" >&2; exit 1 ;; esac
GATEWAY_PID=""
cleanup() {
    if [ -n "$GATEWAY_PID" ] && kill -0 "$GATEWAY_PID" 2>/dev/null; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$GATEWAY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$GATEWAY_PID" 2>/dev/null || true
    fi
    if [ "${CHECK_WHEEL_KEEP:-}" = 1 ]; then echo "check_wheel.sh: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
step() { printf '\n==> check_wheel: %s\n' "$*"; }
fail() {
    printf 'check_wheel.sh: FAILED: %s\n' "$1" >&2
    if [ -f "$WORK/run/gateway.log" ]; then
        printf -- '--- gateway log (last 60 lines) ---\n' >&2
        tail -n 60 "$WORK/run/gateway.log" >&2
    fi
    exit 1
}

step "build the wheel"
"$PY" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; fail "pip wheel failed"; }
WHEEL="$(ls "$WORK"/dist/dicomproxy-*.whl)"
echo "$(basename "$WHEEL")"

step "install it into a fresh venv in $WORK/venv"
BASE_PY="$("$PY" -c 'import sys; print(sys._base_executable)')"
"$BASE_PY" -m venv "$WORK/venv" || fail "python -m venv failed (apt-get install python3-venv)"
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL" > "$WORK/pip.log" 2>&1 \
    || { tail -n 30 "$WORK/pip.log" >&2; fail "pip install of the wheel failed"; }
mkdir -p "$WORK/run/scripts"
cd "$WORK/run"
INSTALLED="$(env -u PYTHONPATH "$WORK/venv/bin/python" -c 'import dicomproxy; print(dicomproxy.__file__)')"
case "$INSTALLED" in
    "$WORK/venv/"*) echo "dicomproxy imports from $INSTALLED" ;;
    *) fail "dicomproxy imports from $INSTALLED, not from the fresh venv" ;;
esac

step "configure: free ports, a scripts folder with main.lua"
read -r HTTP_PORT DICOM_PORT UPSTREAM_PORT < <("$WORK/venv/bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
cat > appsettings.json <<EOF
{
  "Urls": "http://127.0.0.1:$HTTP_PORT",
  "Upstream": { "Url": "http://127.0.0.1:$UPSTREAM_PORT" },
  "Dicom": { "Host": "127.0.0.1", "Port": $DICOM_PORT },
  "ExtraConfig": { "ScriptsRoot": "scripts", "DataFolder": "data", "TusUploadFolder": "data/tus" }
}
EOF
cat > scripts/main.lua <<'EOF'
function onHttpRequest(request)
  LogInfo("wheel check: onHttpRequest saw " .. request.Path)
end
EOF
echo "HTTP $HTTP_PORT, DICOM $DICOM_PORT, upstream (nothing there) $UPSTREAM_PORT"

step "start dicomproxy serve from $WORK/run"
env -u PYTHONPATH "$WORK/venv/bin/dicomproxy" serve --config "$WORK/run/appsettings.json" > gateway.log 2>&1 &
GATEWAY_PID=$!
HEALTH="http://127.0.0.1:$HTTP_PORT/dicomproxy/health"
deadline=$((SECONDS + WAIT_SECONDS))
status=""
while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$GATEWAY_PID" 2>/dev/null || { wait "$GATEWAY_PID" || true; fail "the gateway exited before answering"; }
    status="$(curl -s -o health.json -w '%{http_code}' --max-time 2 "$HEALTH" || true)"
    [ "$status" = 200 ] && break
    sleep 0.2
done
[ "$status" = 200 ] || fail "GET $HEALTH did not answer 200 within ${WAIT_SECONDS}s (last: ${status:-no answer})"
echo "GET /dicomproxy/health: 200 $(head -c 160 health.json)"
grep -q '"version"' health.json || fail "the health answer has no version: $(cat health.json)"
grep -q "wheel check: onHttpRequest saw /dicomproxy/health" gateway.log \
    || fail "main.lua's onHttpRequest did not run (is prelude.lua in the wheel?)"
echo "main.lua ran: $(grep -m1 'wheel check:' gateway.log)"

step "stop it"
kill -TERM "$GATEWAY_PID"
rc=0
wait "$GATEWAY_PID" || rc=$?
GATEWAY_PID=""
# uvicorn re-raises SIGTERM after a graceful shutdown: 143 (128 + 15) is a clean stop
[ "$rc" = 0 ] || [ "$rc" = 143 ] || fail "the gateway exited with status $rc on SIGTERM"
echo "check_wheel.sh: the installed wheel serves (exit $rc on SIGTERM)"
