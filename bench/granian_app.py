"""The gateway as an ASGI app for granian (bench/granian_bench.py only): ``granian --interface asgi
--factory bench.granian_app:app`` with ``DICOMPROXY_BENCH_CONFIG`` naming the appsettings.json.
Not a way to run the gateway: the listeners' limits, TLS acceptors and drain of ``dicomproxy
serve`` are uvicorn's protocol (dicomproxy/http/server.py, listeners.py) and are missing here."""

from __future__ import annotations

import os
from typing import Any

from dicomproxy.app import build_gateway
from dicomproxy.config.settings import load_settings


def app() -> Any:
    return build_gateway(load_settings(os.environ["DICOMPROXY_BENCH_CONFIG"]))
