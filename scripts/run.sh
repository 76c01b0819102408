#!/usr/bin/env bash
# Run the gateway locally for development:
#   1. scripts/install.sh (idempotent)
#   2. a local Orthanc with DICOMweb on 8042 (HTTP) / 4242 (DICOM), data in ./data/orthanc,
#      unless something already answers on http://127.0.0.1:8042
#   3. exec the gateway: .venv/bin/dicomproxy serve --config appsettings.json
# Extra arguments go to `dicomproxy serve`. The Orthanc started here keeps running after the
# gateway exits (its pid is in data/orthanc/orthanc.pid), so the next run reuses it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install.sh

ORTHANC_URL="http://127.0.0.1:8042"
ORTHANC_DIR="$ROOT/data/orthanc"

printf '\n==> Orthanc on %s\n' "$ORTHANC_URL"
if curl -fsS -o /dev/null --max-time 2 "$ORTHANC_URL/system" 2>/dev/null; then
    echo "something already answers on $ORTHANC_URL; using it"
else
    mkdir -p "$ORTHANC_DIR/db"
    cat >"$ORTHANC_DIR/orthanc.json" <<JSON
{
  "Name": "DicomProxyDevOrthanc",
  "StorageDirectory": "$ORTHANC_DIR/db",
  "IndexDirectory": "$ORTHANC_DIR/db",
  "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
  "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
  "HttpPort": 8042,
  "DicomPort": 4242,
  "DicomAet": "ORTHANC",
  "DicomCheckCalledAet": false,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomModalities": { "dicomproxy": ["DICOMPROXY", "127.0.0.1", 11112] },
  "DicomAlwaysAllowEcho": true,
  "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowFind": true,
  "DicomAlwaysAllowMove": true,
  "DicomAlwaysAllowGet": true,
  "OverwriteInstances": true,
  "StableAge": 5
}
JSON
    setsid /usr/sbin/Orthanc "$ORTHANC_DIR/orthanc.json" >>"$ORTHANC_DIR/orthanc.log" 2>&1 </dev/null &
    echo $! >"$ORTHANC_DIR/orthanc.pid"
    for _ in $(seq 1 300); do
        curl -fsS -o /dev/null --max-time 1 "$ORTHANC_URL/system" 2>/dev/null && break
        kill -0 "$(cat "$ORTHANC_DIR/orthanc.pid")" 2>/dev/null || {
            tail -n 30 "$ORTHANC_DIR/orthanc.log" >&2
            echo "run.sh: Orthanc exited; log: $ORTHANC_DIR/orthanc.log" >&2
            exit 1
        }
        sleep 0.1
    done
    curl -fsS -o /dev/null --max-time 2 "$ORTHANC_URL/system" 2>/dev/null || {
        echo "run.sh: Orthanc did not answer within 30 s; log: $ORTHANC_DIR/orthanc.log" >&2
        exit 1
    }
    echo "Orthanc started (pid $(cat "$ORTHANC_DIR/orthanc.pid"), log $ORTHANC_DIR/orthanc.log);" \
        "stop it with: kill $(cat "$ORTHANC_DIR/orthanc.pid")"
fi

printf '\n==> dicomproxy serve\n'
CONFIG="${DICOMPROXY_CONFIG:-appsettings.json}"
if [ -f "$CONFIG" ]; then
    exec "$ROOT/.venv/bin/dicomproxy" serve --config "$CONFIG" "$@"
fi
echo "($CONFIG not found: running with the built-in defaults)"
exec "$ROOT/.venv/bin/dicomproxy" serve "$@"
