#!/usr/bin/env python3
"""Reverse-proxy benchmark (issue 2, item 11): the gateway vs direct vs nginx + Lua.

Starts its own real peers on free loopback ports, in a tmp folder:

* ``direct``        a real Orthanc 1.10 with its DICOMweb plugin (the upstream of everything)
* ``gw-none``       the gateway (``python -m dicomproxy serve``) with no script
* ``gw-singleton``  the gateway with ``main.lua`` defining ``onHttpRequest`` + ``onHttpResponse``
* ``gw-transient``  the gateway with ``main-transient.lua`` defining the same two hooks
* ``nginx-lua-w1``  Debian nginx + ``libnginx-mod-http-lua``, ``worker_processes 1``,
  ``access_by_lua_block`` + ``header_filter_by_lua_block`` doing the same work, keepalive upstream
* ``nginx-lua-auto`` the same with ``worker_processes auto`` (one worker per core)

The hooks read the request's User-Agent, add it as a header sent upstream and as a response
header, and add one more response header when the response starts. Every target is checked
before it is measured (same body as direct, hook headers present).

Payloads: ``json`` is Orthanc's ``GET /series/{id}`` for a series of 28 small instances, a
~2.1 KB JSON document answered from Orthanc's index (QIDO-RS ``/dicom-web/studies`` would be
the DICOMweb choice, but Orthanc 1.10 answers only ~500 req/s there, which would hide the
proxy's cost); ``10mb`` is ``GET /instances/{id}/file`` of a 2560 x 2048 16-bit CT instance
(10,486,888 bytes).

Load: ``wrk`` (one thread) at 1 and 32 connections. It shares the machine's cores with
Orthanc and the proxy under test, so absolute numbers are low; compare ratios from the same run.

    python bench/proxy_bench.py                 # ~8 s per cell, ~5 minutes in all
    python bench/proxy_bench.py --quick         # ~3 s per cell
    python bench/proxy_bench.py --targets gw-singleton,nginx-lua-w1 --payloads json
    python bench/proxy_bench.py --profile DIR   # py-spy the gateway variants under load

Not a test: it prints tables (Markdown) and a PASS/FAIL line per issue target.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402 - the bench folder is not a package
    NGINX_BIN,
    ROOT,
    WRK_BIN,
    BenchError,
    Peer,
    Peers,
    WrkResult,
    cpu_seconds,
    machine_info,
    make_dicom,
    require,
    run_wrk,
    tool_version,
    which,
)

USER_AGENT = "dicomproxy-bench"

# --------------------------------------------------------------------------- the hooks
GATEWAY_HOOKS = """\
-- proxy_bench: a little real work per request, the same as the nginx access/header filters.
function onHttpRequest(request)
  local agent = request.Headers["User-Agent"] or "-"
  request:AddHeader("X-Bench-Agent", agent)          -- sent upstream
  request:AddResponseHeader("X-Agent-Seen", agent)   -- sent to the client
end

function onHttpResponse(response)
  local ctype = response.Headers["Content-Type"] or "none"
  response:AddHeader("X-Served-By", "dicomproxy " .. response.Method .. " " .. ctype)
end
"""

NGINX_ACCESS = """\
                local agent = ngx.req.get_headers()["User-Agent"] or "-"
                ngx.req.set_header("X-Bench-Agent", agent)
                ngx.ctx.agent = agent
"""
NGINX_HEADER_FILTER = """\
                ngx.header["X-Agent-Seen"] = ngx.ctx.agent
                local ctype = ngx.header["Content-Type"] or "none"
                ngx.header["X-Served-By"] = "nginx " .. ngx.req.get_method() .. " " .. ctype
"""

TARGETS = ("direct", "gw-none", "gw-singleton", "gw-transient", "nginx-lua-w1", "nginx-lua-auto")
GATEWAYS = ("gw-none", "gw-singleton", "gw-transient")
HOOKED = ("gw-singleton", "gw-transient", "nginx-lua-w1", "nginx-lua-auto")
PAYLOADS = ("json", "10mb")
CONNECTIONS = (1, 32)

# Issue 2 targets
SINGLETON_RPS_SHARE = 0.15
LARGE_MBPS_SHARE = 0.80
TRANSIENT_MAX_US = 200.0


# --------------------------------------------------------------------------- data
@dataclass
class Payload:
    name: str
    path: str
    body: bytes


def seed_orthanc(orthanc: Peer) -> dict[str, Payload]:
    """Store the bench data in Orthanc and fetch the reference bodies directly."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    session = requests.Session()

    def post(data: bytes) -> dict:
        r = session.post(
            orthanc.url + "/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=60
        )
        r.raise_for_status()
        return r.json()

    small, _ = make_dicom(16, 16, patient_id="BENCH1", description="Proxy bench")
    ds = dcmread(io.BytesIO(small))
    series = ""
    for i in range(28):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        series = post(buf.getvalue())["ParentSeries"]
    big, _ = make_dicom(2560, 2048, patient_id="BENCH2", description="Proxy bench large")
    big_id = post(big)["ID"]
    deadline = time.monotonic() + 15  # StableAge is 1 s: let the JSON settle before measuring it
    while not session.get(f"{orthanc.url}/series/{series}", timeout=10).json().get("IsStable"):
        if time.monotonic() > deadline:
            raise BenchError("Orthanc did not mark the bench series stable within 15 s")
        time.sleep(0.25)
    out = {}
    for name, path in (("json", f"/series/{series}"), ("10mb", f"/instances/{big_id}/file")):
        r = session.get(orthanc.url + path, timeout=60)
        r.raise_for_status()
        out[name] = Payload(name, path, r.content)
    if out["10mb"].body != big:
        raise BenchError("Orthanc did not return the stored 10 MB file byte for byte")
    return out


def verify(target: str, peer: Peer, orthanc: Peer, payloads: dict[str, Payload]) -> None:
    """Same bytes as direct, and the hook headers present: the target really does the work."""
    for p in payloads.values():
        r = requests.get(peer.url + p.path, headers={"User-Agent": USER_AGENT}, timeout=60)
        if r.status_code != 200:
            raise BenchError(f"{target}: GET {p.path} -> {r.status_code}: {r.text[:300]}")
        # Fetched again now: Orthanc's JSON changes once (IsStable) after StableAge.
        direct = requests.get(orthanc.url + p.path, timeout=60).content
        if r.content != direct:
            raise BenchError(
                f"{target}: GET {p.path} returned {len(r.content)} bytes that differ from direct ({len(direct)} bytes)"
            )
        if target.removeprefix(BASE) in HOOKED:
            seen, served = r.headers.get("X-Agent-Seen"), r.headers.get("X-Served-By", "")
            if seen != USER_AGENT or " GET " not in served:
                raise BenchError(f"{target}: hook headers missing (X-Agent-Seen={seen!r}, X-Served-By={served!r})")
        elif "X-Served-By" in r.headers:
            raise BenchError(f"{target}: unexpected X-Served-By header: a script is running")


# --------------------------------------------------------------------------- targets
BASE = "base-"  # prefix of a gateway target run from the --baseline checkout


def start_target(peers: Peers, target: str, upstream: str, baseline: Path | None = None) -> Peer:
    if target.startswith(BASE):
        if baseline is None:
            raise BenchError(f"{target} needs --baseline DIR")
        python = baseline / ".venv" / "bin" / "python"
        require(str(python), f"make the baseline's venv: cd {baseline} && bash scripts/install.sh")
        kind = target.removeprefix(BASE)
        scripts = {"gw-singleton": {"main.lua": GATEWAY_HOOKS}, "gw-transient": {"main-transient.lua": GATEWAY_HOOKS}}
        return peers.gateway(target, upstream, scripts=scripts.get(kind), root=baseline, python=str(python))
    if target == "gw-none":
        return peers.gateway(target, upstream)
    if target == "gw-singleton":
        return peers.gateway(target, upstream, scripts={"main.lua": GATEWAY_HOOKS})
    if target == "gw-transient":
        return peers.gateway(target, upstream, scripts={"main-transient.lua": GATEWAY_HOOKS})
    if target.startswith("nginx-lua-"):
        workers = "1" if target.endswith("w1") else "auto"
        return peers.nginx(
            target, upstream, workers=workers, access_lua=NGINX_ACCESS, header_filter_lua=NGINX_HEADER_FILTER
        )
    raise ValueError(target)


@dataclass
class Cell:
    target: str
    payload: str
    connections: int
    runs: list[WrkResult] = field(default_factory=list)
    proxy_cpu: list[float] = field(default_factory=list)  # CPU s of the proxy process(es) per run
    upstream_cpu: list[float] = field(default_factory=list)  # CPU s of Orthanc per run
    wrk_cpu: list[float] = field(default_factory=list)  # CPU s of wrk per run

    def best(self) -> WrkResult:
        """The median run by req/s (with one round, the only one)."""
        runs = sorted(self.runs, key=lambda r: r.rps)
        return runs[len(runs) // 2]

    def _median(self, values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else 0.0

    def cpu_us_per_request(self, which: str) -> float:
        values = {"proxy": self.proxy_cpu, "upstream": self.upstream_cpu, "wrk": self.wrk_cpu}[which]
        per = [v / r.requests * 1e6 for v, r in zip(values, self.runs, strict=False) if r.requests]
        return self._median(per)


def load_average() -> str:
    """The 1/5/15-minute load averages: anything well above 0 means the machine is shared."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(
    cell: Cell, url: str, duration: float, warmup: float, workdir: Path, proxy_pid: int | None, orthanc_pid: int
) -> WrkResult:
    if warmup > 0:
        run_wrk(url, connections=cell.connections, duration=warmup, workdir=workdir)
    p0 = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    o0 = cpu_seconds(orthanc_pid)
    w0 = children_cpu()
    result = run_wrk(url, connections=cell.connections, duration=duration, workdir=workdir)
    cell.wrk_cpu.append(children_cpu() - w0)
    cell.upstream_cpu.append(cpu_seconds(orthanc_pid) - o0)
    cell.proxy_cpu.append((cpu_seconds(proxy_pid) - p0) if proxy_pid else 0.0)
    if result.errors or result.non_2xx:
        print(
            f"  ! {cell.target} {cell.payload} c={cell.connections}: {result.errors} socket errors, "
            f"{result.non_2xx} non-2xx responses",
            flush=True,
        )
    cell.runs.append(result)
    return result


# --------------------------------------------------------------------------- formatting
def fmt_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b * 100:.1f}%" if b else "n/a"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def report(
    cells: dict[tuple[str, str, int], Cell],
    targets: list[str],
    payloads: list[str],
    conns: list[int],
    args: argparse.Namespace,
) -> tuple[str, bool]:
    out: list[str] = []
    rows = []
    for payload in payloads:
        for c in conns:
            for t in targets:
                cell = cells.get((t, payload, c))
                if cell is None or not cell.runs:
                    continue
                r = cell.best()
                proxy_cpu = cell.cpu_us_per_request("proxy")
                rows.append(
                    [
                        t,
                        payload,
                        str(c),
                        f"{r.rps:,.0f}",
                        fmt_us(r.p50_us),
                        fmt_us(r.p99_us),
                        f"{r.mib_per_s:,.0f}" if payload == "10mb" else "-",
                        fmt_us(proxy_cpu) if t != "direct" else "-",
                        fmt_us(cell.cpu_us_per_request("upstream")),
                        str(r.errors + r.non_2xx),
                    ]
                )
    out.append(
        table(
            [
                "target",
                "payload",
                "conns",
                "req/s",
                "p50",
                "p99",
                "MiB/s",
                "proxy CPU/req",
                "Orthanc CPU/req",
                "errors",
            ],
            rows,
        )
    )

    def rps(t: str, p: str, c: int) -> float | None:
        cell = cells.get((t, p, c))
        return cell.best().rps if cell and cell.runs else None

    def mibs(t: str, p: str, c: int) -> float | None:
        cell = cells.get((t, p, c))
        return cell.best().mib_per_s if cell and cell.runs else None

    # Ratios: each gateway variant against direct and nginx + Lua, same payload and connections.
    rows = []
    for payload in payloads:
        for c in conns:
            for g in GATEWAYS:
                mine = rps(g, payload, c)
                if mine is None:
                    continue
                refs = [rps(ref, payload, c) for ref in ("direct", "nginx-lua-w1", "nginx-lua-auto")]
                rows.append([g, payload, str(c), *(fmt_ratio(mine, ref) if ref else "n/a" for ref in refs)])
    if rows:
        out.append("\nGateway req/s as a share of the reference (same payload, same connections):\n")
        out.append(
            table(["gateway", "payload", "conns", "vs direct", "vs nginx+Lua (1 worker)", "vs nginx+Lua (auto)"], rows)
        )

    # The targets. Rounds are interleaved, so the runs of round r of two targets were
    # measured back to back under the same outside load: compare them pairwise, take the median.
    def paired(a: str, b: str, payload: str, c: int, fn: Callable[[WrkResult, WrkResult], float]) -> list[float]:
        ca, cb = cells.get((a, payload, c)), cells.get((b, payload, c))
        if not ca or not cb:
            return []
        return [fn(ra, rb) for ra, rb in zip(ca.runs, cb.runs, strict=False) if rb.requests and ra.requests]

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def rounds(values: list[float], fmt: str) -> str:
        return "" if len(values) < 2 else " (rounds: " + ", ".join(format(v, fmt) for v in values) + ")"

    def cpu(t: str, p: str, c: int) -> float:
        cell = cells.get((t, p, c))
        return cell.cpu_us_per_request("proxy") if cell and cell.runs else 0.0

    checks: list[tuple[str, bool, str]] = []
    for ref in ("nginx-lua-w1", "nginx-lua-auto"):
        shares = paired("gw-singleton", ref, "json", 32, lambda a, b: a.rps / b.rps)
        if shares:
            share = median(shares)
            mine, theirs = cpu("gw-singleton", "json", 32), cpu(ref, "json", 32)
            checks.append(
                (
                    f"singleton hooks >= {SINGLETON_RPS_SHARE:.0%} of {ref} req/s (json, 32 conns)",
                    share >= SINGLETON_RPS_SHARE,
                    f"{share:.1%}{rounds(shares, '.1%')}; proxy CPU per request {fmt_us(mine)} vs {fmt_us(theirs)}"
                    + (f" (CPU-bound capacity ratio {theirs / mine:.1%})" if mine else ""),
                )
            )
    for ref in ("nginx-lua-w1", "nginx-lua-auto"):
        for c in conns:
            shares = paired("gw-singleton", ref, "10mb", c, lambda a, b: a.mib_per_s / b.mib_per_s)
            if shares:
                share = median(shares)
                mine, theirs = cpu("gw-singleton", "10mb", c), cpu(ref, "10mb", c)
                checks.append(
                    (
                        f"10 MB objects >= {LARGE_MBPS_SHARE:.0%} of {ref} MiB/s (singleton hooks, "
                        f"{c} conn{'s' if c > 1 else ''})",
                        share >= LARGE_MBPS_SHARE,
                        f"{share:.1%}{rounds(shares, '.1%')}; proxy CPU per object {fmt_us(mine)} vs {fmt_us(theirs)}",
                    )
                )
    # A transient engine's own cost: the same two hooks, in a fresh engine per request instead of
    # the singleton. (Over no script at all, the hooks' own work counts too; printed alongside.)
    added_us = paired("gw-transient", "gw-singleton", "json", 1, lambda a, b: (1 / a.rps - 1 / b.rps) * 1e6)
    if added_us:
        added = median(added_us)
        p50 = median(paired("gw-transient", "gw-singleton", "json", 1, lambda a, b: a.p50_us - b.p50_us))
        detail = f"{added:+.0f} µs{rounds(added_us, '+.0f')}; p50 difference {p50:+.0f} µs"
        vs_none = paired("gw-transient", "gw-none", "json", 1, lambda a, b: (1 / a.rps - 1 / b.rps) * 1e6)
        if vs_none:
            detail += f"; transient hooks vs no script {median(vs_none):+.0f} µs"
        t_cpu, s_cpu = cpu("gw-transient", "json", 1), cpu("gw-singleton", "json", 1)
        detail += f"; cross-check, gateway CPU per request {fmt_us(t_cpu)} vs {fmt_us(s_cpu)} ({t_cpu - s_cpu:+.0f} µs)"
        checks.append(
            (
                f"a transient engine adds <= {TRANSIENT_MAX_US:.0f} µs per request over the same hooks in the "
                "singleton (json, 1 conn, mean time per request = 1/req/s)",
                added <= TRANSIENT_MAX_US,
                detail,
            )
        )
    out.extend(baseline_report(cells, targets, payloads, conns))
    all_pass = True
    if checks:
        out.append("\nIssue 2 targets:\n")
        for name, ok, detail in checks:
            all_pass = all_pass and bool(ok)
            out.append(f"- {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return "\n".join(out), all_pass


def baseline_report(
    cells: dict[tuple[str, str, int], Cell], targets: list[str], payloads: list[str], conns: list[int]
) -> list[str]:
    """Proxy CPU per request of each gateway against the same variant run from ``--baseline``,
    round by round (the rounds of the two ran back to back): the median of the per-round ratios."""
    rows = []
    for payload in payloads:
        for c in conns:
            for t in targets:
                mine, base = cells.get((t, payload, c)), cells.get((BASE + t, payload, c))
                if not mine or not base or not mine.runs or not base.runs:
                    continue
                per = [
                    (m / rm.requests * 1e6, b / rb.requests * 1e6)
                    for m, rm, b, rb in zip(mine.proxy_cpu, mine.runs, base.proxy_cpu, base.runs, strict=False)
                    if rm.requests and rb.requests
                ]
                ratios = sorted(m / b for m, b in per if b)
                if not ratios:
                    continue
                rows.append([
                    t, payload, str(c), ", ".join(fmt_us(b) for _, b in per), ", ".join(fmt_us(m) for m, _ in per),
                    f"{ratios[len(ratios) // 2]:.3f}",
                ])
    if not rows:
        return []
    return [
        "\nProxy CPU per request, this checkout vs --baseline (same run, rounds interleaved):\n",
        table(["gateway", "payload", "conns", "baseline per round", "this per round", "median ratio"], rows),
    ]


def revision() -> str:
    """The commit measured, and whether the gateway's code differs from it (it is being tuned)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "dicomproxy", "middleware"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}{' + uncommitted changes in dicomproxy/ or middleware/' if dirty else ''}"


def header(args: argparse.Namespace, payloads: dict[str, Payload]) -> str:
    m = machine_info()
    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}",
        f"Tools: {tool_version([WRK_BIN, '-v'])}; {tool_version([NGINX_BIN, '-v'])}; "
        f"Orthanc {tool_version(['/usr/sbin/Orthanc', '--version'])}",
        f"Load generator: wrk, 1 thread, {args.duration:g} s per cell after a {args.warmup:g} s warm-up, "
        f"{args.rounds} round(s) (median by req/s). wrk, Orthanc and the proxy under test share the "
        f"{m['cpus']} cores, so absolute numbers are low; compare the ratios (same run).",
        "Payloads: "
        + "; ".join(
            f"{p.name} = GET {p.path.split('/')[1]}/{{id}}{'/file' if p.name == '10mb' else ''} ({len(p.body):,} bytes)"
            for p in payloads.values()
        ),
        "CPU/req: CPU time (user+sys) of that process (nginx: master + workers) divided by requests served.",
        f"Gateway code: {revision()}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- in-process
MICRO_CHILD = r"""
import asyncio, gc, json, shutil, sys, time
from pathlib import Path
from dicomproxy.app import build_gateway
from dicomproxy.config.settings import load_settings

workdir, hooks, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
only = sys.argv[4] if len(sys.argv) > 4 else ""  # "count:<variant>": one untimed pass, for callgrind
BODY = b"x" * 2185

async def dummy(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2185")]})
    await send({"type": "http.response.body", "body": BODY})

async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}

async def measure(variant):
    scripts = workdir / "scripts"
    shutil.rmtree(scripts, ignore_errors=True)
    scripts.mkdir(parents=True)
    if variant != "none":
        (scripts / ("main.lua" if variant == "singleton" else "main-transient.lua")).write_text(hooks)
    gateway = build_gateway(load_settings(str(workdir / "appsettings.json")))
    gateway.mount("/", dummy)  # every path: the dummy app stands in for the proxy
    await gateway.lua.start()
    app = gateway.build()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/series/x", "raw_path": b"/series/x", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
             "headers": [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"dicomproxy-bench"),
                         (b"accept", b"*/*")]}
    sent = []
    async def send(message):
        sent.append(message)
    best = float("inf")
    if only:
        for _ in range(20):
            await app(dict(scope), receive, send)
        sent.clear()
        for _ in range(n):
            await app(dict(scope), receive, send)
            await asyncio.sleep(0)
        gc.collect()
        await gateway.lua.stop()
        return 0.0
    for _ in range(3):
        for _ in range(n // 10):
            await app(dict(scope), receive, send)
        sent.clear()
        gc.collect()
        t0 = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)
            await asyncio.sleep(0)  # background work (the transient pool refill) runs, as on the server
        gc.collect()  # engines freed by the cyclic GC are part of the cost
        best = min(best, (time.process_time() - t0) / n * 1e6)
    headers = {k for k, _ in sent[0]["headers"]}
    if variant != "none" and b"x-served-by" not in headers:
        raise SystemExit(f"{variant}: the hooks did not run")
    await gateway.lua.stop()
    return best

async def main():
    if only:
        await measure(only.removeprefix("count:"))
        return
    out = {}
    for variant in ("none", "singleton", "transient"):
        out[variant] = await measure(variant)
    print("MICROJSON " + json.dumps(out))

asyncio.run(main())
"""


def _micro_setup(workdir: Path) -> tuple[Path, dict[str, str]]:
    wd = workdir / "micro"
    (wd / "data").mkdir(parents=True, exist_ok=True)
    config = {
        "Urls": "http://127.0.0.1:9",
        "Upstream": {"Url": "http://127.0.0.1:9"},
        "ExtraConfig": {
            "ScriptsRoot": str(wd / "scripts"),
            "DataFolder": str(wd / "data"),
            "TusUploadFolder": str(wd / "data" / "tus"),
        },
        "Dicom": {"Port": 0, "SpoolFolder": str(wd / "data" / "spool")},
        "Logging": {"Level": "WARNING"},
    }
    (wd / "appsettings.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return wd, env


def middleware_cpu(workdir: Path, n: int) -> dict[str, float]:
    """CPU µs per request of the gateway's ASGI stack (auth, Lua hooks, routing) with a dummy app
    in place of the proxy, in a child process: no network, no Orthanc, so no noise from them."""
    wd, env = _micro_setup(workdir)
    out = subprocess.run(
        [sys.executable, "-c", MICRO_CHILD, str(wd), GATEWAY_HOOKS, str(n)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=wd,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MICROJSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"in-process measurement failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("MICROJSON "))


def middleware_instructions(workdir: Path, low: int = 50, high: int = 250) -> dict[str, float]:
    """Thousands of instructions per request of the same in-process stack, counted by callgrind.

    CPU time on a shared two-core machine swings by 10-40 % from run to run; instruction counts
    do not. Each variant runs twice under callgrind (``low`` and ``high`` requests after the
    same start-up and warm-up); the difference over ``high - low`` is the per-request count.
    """
    valgrind = require("/usr/bin/valgrind", "apt-get install valgrind")
    wd, env = _micro_setup(workdir)
    out: dict[str, float] = {}
    for variant in ("none", "singleton", "transient"):
        totals = []
        for n in (low, high):
            cg_out = wd / f"callgrind-{variant}-{n}.out"
            proc = subprocess.run(
                [valgrind, "--tool=callgrind", f"--callgrind-out-file={cg_out}", sys.executable, "-c",
                 MICRO_CHILD, str(wd), GATEWAY_HOOKS, str(n), f"count:{variant}"],
                capture_output=True, text=True, timeout=900, env={**env, "PYTHONHASHSEED": "0"}, cwd=wd,
            )
            match = re.search(r"^(?:summary|totals): (\d+)", cg_out.read_text() if cg_out.exists() else "", re.M)
            if proc.returncode != 0 or match is None:
                raise BenchError(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            totals.append(int(match.group(1)))
        out[variant] = (totals[1] - totals[0]) / (high - low) / 1000
    return out


def instructions_report(counts: dict[str, float]) -> str:
    none, single = counts["none"], counts["singleton"]
    rows = [
        [v, f"{k:,.0f}", f"{k - none:+,.0f}" if v != "none" else "-",
         f"{k - single:+,.0f}" if v == "transient" else "-"]
        for v, k in counts.items()
    ]
    text = (
        "\nInstructions per request of the same in-process stack (callgrind, thousands; exact and repeatable, "
        "unlike CPU time on a shared machine):\n\n"
    )
    return text + table(["variant", "kIr/request", "vs no script", "vs singleton"], rows)


def micro_report(micro: dict[str, float]) -> str:
    none = micro["none"]
    rows = [[v, fmt_us(us), f"{us - none:+.0f} µs" if v != "none" else "-"] for v, us in micro.items()]
    text = (
        "\nIn-process CPU per request of the gateway's ASGI stack (auth, Lua hooks, routing; a dummy app in "
        "place of the proxy, no network; best of 3):\n\n"
    )
    return text + table(["variant", "CPU/request", "vs no script"], rows)


# --------------------------------------------------------------------------- profiling
def profile(
    peers: Peers,
    orthanc: Peer,
    payloads: dict[str, Payload],
    targets: list[str],
    outdir: Path,
    duration: float,
    workdir: Path,
) -> None:
    """py-spy the gateway variants under load (32 conns); print the top frames by self and total time."""
    py_spy = which("py-spy")
    if py_spy is None:
        raise BenchError("py-spy is missing: pip install py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if target not in GATEWAYS:
            continue
        peer = start_target(peers, target, orthanc.url)
        try:
            verify(target, peer, orthanc, payloads)
            for payload in payloads.values():
                raw = outdir / f"{target}-{payload.name}.txt"
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(peer.process.pid),
                        "--format",
                        "raw",
                        "--rate",
                        "250",
                        "--duration",
                        str(int(duration)),
                        "--nonblocking",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                try:
                    time.sleep(0.5)
                    result = run_wrk(peer.url + payload.path, connections=32, duration=duration - 1, workdir=workdir)
                    _, err = spy.communicate(timeout=duration + 30)
                finally:
                    if spy.poll() is None:
                        spy.kill()
                        spy.wait()
                print(
                    f"\n## {target} {payload.name} 32 conns under py-spy: {result.rps:,.0f} req/s "
                    f"(profiler attached; not comparable to the table)"
                )
                if not raw.exists():
                    print(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
                    continue
                print(summarize_raw(raw))
        finally:
            peers.stop(peer)


def summarize_raw(path: Path, top: int = 25) -> str:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) file, by self and by total samples."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return "(no samples)"
    lines = [f"{samples} samples; top by self time:"]
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("top by total time (frame on the stack):")
    lines += [f"  {n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=None, help="seconds per cell (default 8, --quick 3)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 1)")
    ap.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every cell N times; report the median")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    ap.add_argument("--payloads", default=",".join(PAYLOADS), help="json, 10mb")
    ap.add_argument("--connections", default=",".join(map(str, CONNECTIONS)), help="default 1,32")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="instead of the table: py-spy each gateway variant at 32 conns, raw stacks into DIR",
    )
    ap.add_argument(
        "--baseline", metavar="DIR", type=Path,
        help="also run each gateway target from this checkout (its own .venv) as base-<target>, interleaved",
    )
    ap.add_argument("--time-limit", type=float, default=1800, help="abort after this many seconds (default 1800)")
    ap.add_argument("--keep", action="store_true", help="keep the tmp folder (logs, configs)")
    ap.add_argument("--no-micro", action="store_true", help="skip the in-process (no network) measurement")
    ap.add_argument(
        "--instructions", action="store_true",
        help="also count instructions per request of the in-process stack with callgrind (~5 min)",
    )
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else 1.0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    payload_names = [p.strip() for p in args.payloads.split(",") if p.strip()]
    conns = [int(c) for c in args.connections.split(",") if c.strip()]
    if args.baseline:
        targets += [BASE + t for t in targets if t in GATEWAYS]
    for t in targets:
        if t.removeprefix(BASE) not in TARGETS:
            ap.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    for p in payload_names:
        if p not in PAYLOADS:
            ap.error(f"unknown payload {p!r}; choose from {', '.join(PAYLOADS)}")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"the benchmark ran past --time-limit {args.time_limit:g} s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_limit)))
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    try:
        with Peers(workdir) as peers:
            orthanc = peers.orthanc(extra={"StableAge": 1})
            payloads = {k: v for k, v in seed_orthanc(orthanc).items() if k in payload_names}
            print(header(args, payloads), flush=True)
            if args.profile:
                profile(peers, orthanc, payloads, targets, args.profile, max(args.duration, 5), workdir)
                return 0
            # Warm Orthanc up (its caches, page cache for the 10 MB file) before anything is recorded.
            for p in payloads.values():
                run_wrk(orthanc.url + p.path, connections=8, duration=2, workdir=workdir)
            # Every target runs at once and the cells are interleaved (target order rotated per
            # round): the machine may be shared, and outside load then hits all targets alike.
            running: dict[str, Peer] = {}
            for target in targets:
                running[target] = orthanc if target == "direct" else start_target(
                    peers, target, orthanc.url, args.baseline
                )
                verify(target, running[target], orthanc, payloads)
            print(f"Load average before: {load_average()}", flush=True)
            cells: dict[tuple[str, str, int], Cell] = {}
            for p in payloads.values():
                for c in conns:
                    for rnd in range(args.rounds):
                        shift = rnd % len(targets)
                        for target in targets[shift:] + targets[:shift]:
                            peer = running[target]
                            cell = cells.setdefault((target, p.name, c), Cell(target, p.name, c))
                            proxy_pid = None if target == "direct" else peer.process.pid
                            r = measure(
                                cell,
                                peer.url + p.path,
                                args.duration,
                                args.warmup,
                                workdir,
                                proxy_pid,
                                orthanc.process.pid,
                            )
                            print(
                                f"  {p.name:5} c={c:<3} round {rnd + 1}  {target:15} {r.rps:9,.0f} req/s  "
                                f"p50 {fmt_us(r.p50_us):>9}  p99 {fmt_us(r.p99_us):>9}"
                                + (f"  {r.mib_per_s:,.0f} MiB/s" if p.name == "10mb" else ""),
                                flush=True,
                            )
            for target, peer in running.items():
                if peer is not orthanc and not peer.process.alive():
                    raise BenchError(f"{target} died during the run; see {peer.process.log_path}")
            print(f"Load average after: {load_average()}", flush=True)
            text, ok = report(cells, targets, payload_names, conns, args)
            print("\n" + text, flush=True)
            if not args.no_micro:
                print(micro_report(middleware_cpu(workdir, 500 if args.quick else 2000)), flush=True)
            if args.instructions:
                print(instructions_report(middleware_instructions(workdir)), flush=True)
            return 0 if ok else 1
    except BenchError as e:
        print(f"proxy_bench: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TimeoutError) as e:
        print(f"proxy_bench: interrupted ({e}); peers stopped", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"(kept {workdir})", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
