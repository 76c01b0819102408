#!/usr/bin/env bash
# Install everything DicomProxy and its test suite need, on Debian bookworm (run as root).
#
# Idempotent and quick on a machine that already has it all: system packages are only
# installed when missing, the venv is only re-synced when pyproject.toml changed, and
# tests/js/node_modules only when package-lock.json changed.
#
#   system: orthanc + DICOMweb plugin (test PACS), dcmtk (DICOM peers), lua-socket, nginx +
#           lua module, chromium + fonts (UI tests), python3 + venv, nodejs + npm (tus-js-client), curl,
#           wrk (bench/proxy_bench.py), rsyslog + rsyslog-gnutls (the audit trail's TLS/UDP collector),
#           prometheus (scrapes a gateway in tests/e2e/test_ui_grafana.py: the Grafana panels' PromQL)
#           redis-server (Cluster:Redis in tests/e2e/test_tus_replicas.py; SeaweedFS comes from PyPI)
#   python: .venv with `pip install -e .[test]`
#   node:   tests/js/node_modules (npm ci): tus-js-client, oidc-provider (the OpenID provider of the
#           bearer-token tests)
#
# Services (orthanc, nginx, rsyslog) are never started here: tests start their own on free ports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PACKAGES=(
    orthanc orthanc-dicomweb dcmtk
    lua-socket nginx libnginx-mod-http-lua
    wrk valgrind
    chromium fonts-liberation
    python3 python3-venv python3-pip
    nodejs npm
    curl ca-certificates openssl
    rsyslog rsyslog-gnutls
    prometheus
    redis-server
)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------- system
pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null || true)" = "ii " ]
}

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        case "$pkg" in
            # NodeSource's nodejs bundles npm and conflicts with Debian's npm package.
            npm) command -v npm >/dev/null 2>&1 && continue ;;
        esac
        pkg_installed "$pkg" || printf '%s\n' "$pkg"
    done
}

step "System packages (Debian)"
command -v dpkg-query >/dev/null 2>&1 || die "this script supports Debian bookworm (dpkg/apt) only"
mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -eq 0 ]; then
    echo "all present: ${APT_PACKAGES[*]}"
else
    echo "missing: ${MISSING[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "installing ${MISSING[*]} needs root: run as root or install sudo"
        SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting orthanc/nginx as system services (no systemd here,
    # and the tests start their own instances on free ports). Only our own policy file is removed.
    POLICY=/usr/sbin/policy-rc.d
    CREATED_POLICY=0
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# written by dicomproxy scripts/install.sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
        "${SUDO[@]}" chmod 755 "$POLICY"
        CREATED_POLICY=1
    fi
    cleanup_policy() { [ "$CREATED_POLICY" = 1 ] && "${SUDO[@]}" rm -f "$POLICY"; return 0; }
    trap cleanup_policy EXIT
    apt_install() {
        "${SUDO[@]}" apt-get install -y --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
    }
    # apt-get update only when there are no package lists, or when installing fails with them.
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
        "${SUDO[@]}" apt-get update
        apt_install "${MISSING[@]}"
    elif ! apt_install "${MISSING[@]}"; then
        echo "install failed with the current package lists; running apt-get update and retrying"
        "${SUDO[@]}" apt-get update
        apt_install "${MISSING[@]}"
    fi
    cleanup_policy
    trap - EXIT
    mapfile -t STILL < <(missing_packages)
    [ "${#STILL[@]}" -eq 0 ] || die "packages still missing after apt-get install: ${STILL[*]}"
fi
for bin in /usr/sbin/Orthanc /usr/bin/storescu /usr/bin/echoscu /usr/bin/storescp /usr/bin/node; do
    [ -x "$bin" ] || die "$bin is missing although its package is installed"
done
[ -x /usr/sbin/rsyslogd ] || die "/usr/sbin/rsyslogd is missing although rsyslog is installed"
[ -f /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || die "rsyslog's TLS driver is missing (rsyslog-gnutls)"
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || die "Orthanc DICOMweb plugin missing (orthanc-dicomweb)"

# ---------------------------------------------------------------------------------- python
step "Python virtual environment (.venv)"
py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
PYTHON=""
for candidate in "${DICOMPROXY_PYTHON:-}" python3 /usr/bin/python3 python3.12 python3.11; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate"; then
        PYTHON="$("$candidate" -c "import sys; print(sys.executable)")"
        break
    fi
done
[ -n "$PYTHON" ] || die "no python3 >= 3.11 found (apt-get install python3 on bookworm gives 3.11)"
echo "using $PYTHON ($("$PYTHON" --version 2>&1))"

VENV="$ROOT/.venv"
if [ -x "$VENV/bin/python" ] && ! py_ok "$VENV/bin/python"; then
    echo "existing .venv is older than Python 3.11 or broken; recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
fi

STAMP="$VENV/.dicomproxy-install-stamp"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$VENV/bin/python" -c 'import dicomproxy, pytest, pytest_timeout' 2>/dev/null; then
    echo ".venv is up to date with pyproject.toml"
else
    PIP_LOG="$VENV/pip-install.log"
    pip_run() {
        if ! "$VENV/bin/python" -m pip install "$@" >>"$PIP_LOG" 2>&1; then
            tail -n 40 "$PIP_LOG" >&2
            die "pip install $* failed (full log: $PIP_LOG)"
        fi
    }
    : >"$PIP_LOG"
    pip_run --upgrade pip setuptools wheel
    pip_run -e ".[test]"
    "$VENV/bin/python" -c 'import dicomproxy, pytest, pytest_timeout' || die "the venv cannot import dicomproxy"
    echo "$WANT" >"$STAMP"
    echo "installed -e .[test] into .venv"
fi

# ---------------------------------------------------------------------------------- node
step "Node packages (tests/js)"
JS="$ROOT/tests/js"
command -v npm >/dev/null 2>&1 || die "npm is missing (apt-get install npm)"
JS_STAMP="$JS/node_modules/.dicomproxy-install-stamp"
JS_WANT="$(cat "$JS/package.json" "$JS"/package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ -f "$JS_STAMP" ] && [ "$(cat "$JS_STAMP")" = "$JS_WANT" ] && [ -d "$JS/node_modules/tus-js-client" ] \
    && [ -d "$JS/node_modules/oidc-provider" ]; then
    echo "tests/js/node_modules is up to date"
else
    if [ -f "$JS/package-lock.json" ]; then
        (cd "$JS" && npm ci --no-audit --no-fund --loglevel=error)
    else
        (cd "$JS" && npm install --no-audit --no-fund --loglevel=error)
    fi
    [ -d "$JS/node_modules/tus-js-client" ] || die "npm did not install tus-js-client into tests/js"
    [ -d "$JS/node_modules/oidc-provider" ] || die "npm did not install oidc-provider into tests/js"
    echo "$JS_WANT" >"$JS_STAMP"
fi

step "Install complete"
