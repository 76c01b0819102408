"""``onHttpRequest`` / ``onHttpResponse`` in a real gateway (issue 2, item 7).

The gateway runs in front of :mod:`tests.local_upstream`, whose ``/echo`` route returns the
headers it received: that is how the tests see what a hook sent upstream. Each route below is
one behaviour; the scripts are loaded once per module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.local_upstream import BLOCK, LocalUpstream, header_values, pattern_blocks, raw_request
from tests.observe import RssSampler
from tests.peers import GatewayProcess

MAIN = r"""
function onHttpRequest(r)
  local p = r.Path
  if p == "/intercept" then
    r.StatusCode = 418
    r:AddResponseHeader("X-Intercepted", "yes")
    r:AddResponseHeader("Content-Type", "application/json")
    r:ResponseWrite('{"intercepted":')
    r:ResponseWrite("true}")
    return true
  elseif p == "/intercept-default" then
    r:ResponseWrite("plain answer")
    return true
  elseif p == "/intercept-setstatus" then
    r:SetStatusCode(403)
    r.ResponseWrite("forbidden by script")
    return true
  elseif p == "/echo/return-false" then
    r:ResponseWrite("ignored: not intercepted")
    return false
  elseif p == "/echo/edit" then
    r:AddHeader("X-Added", "added")
    r:RemoveHeader("X-Remove-Me")
    r:AddHeader("X-Replace", "new")
    r:AddResponseHeader("X-Seen-After-Add", tostring(r.Headers["x-added"]))
    r:AddResponseHeader("X-Seen-After-Remove", tostring(r.Headers["X-Remove-Me"]))
  elseif p == "/echo/styles" then
    r:AddHeader("X-Colon", "1")
    r.AddHeader("X-Dot", "2")
    r:AddResponseHeader("X-RColon", "3")
    r.AddResponseHeader("X-RDot", "4")
    r.RemoveHeader("X-Gone-Dot")
    r:RemoveHeader("X-Gone-Colon")
  elseif p == "/echo/headers" then
    local names = {}
    for k, v in pairs(r.Headers) do names[#names + 1] = k:lower() end
    table.sort(names)
    r:AddResponseHeader("X-Names", table.concat(names, ","))
    r:AddResponseHeader("X-Lookups", table.concat({
      tostring(r.Headers["x-mixed-case"]), tostring(r.Headers["X-MIXED-CASE"]), tostring(r.Headers["X-Mixed-Case"]),
      tostring(r.Headers["x-twice"]), tostring(r.Headers["x-absent"])}, "|"))
    r:AddResponseHeader("X-Req", table.concat({r.Scheme, r.Method, r.Path, r.QueryString, r.RemoteIp}, "|"))
  elseif p == "/echo/order" then
    r:AddHeader("X-Order", "singleton")
  end
end

function onHttpResponse(res)
  local p = res.Path
  if p == "/echo/resp-edit" then
    res:AddHeader("X-Was", tostring(res.StatusCode) .. " " .. tostring(res.Headers["x-upstream-secret"]))
    res.StatusCode = 203
    res:AddHeader("X-Resp-Added", res.Scheme .. " " .. res.Method .. " " .. res.Path)
    res.AddHeader("X-Resp-Dot", "dot")
    res:RemoveHeader("X-Upstream-Secret")
  elseif p == "/echo/resp-body" then
    res:ResponseWrite("replaced; upstream said ")
    res.ResponseWrite(tostring(res.StatusCode))
  elseif p == "/status/404" then
    res.StatusCode = 200
    res:RemoveHeader("Content-Type")
    res:AddHeader("Content-Type", "application/json")
    res:ResponseWrite('{"mapped":true}')
  elseif p == "/chunked" then
    res:ResponseWrite("short")
  elseif p == "/echo/order" then
    res:AddHeader("X-Resp-Order", "singleton")
  elseif p:sub(1, 12) == "/dicomproxy/" then
    res:AddHeader("X-Hooked", "yes")
  end
end
"""

TRANSIENT = r"""
function onHttpRequest(r)
  mark = r.Path .. "?" .. r.QueryString
  if r.Path == "/echo/order" then
    r:AddHeader("X-Order", tostring(r.Headers["x-order"]) .. ",transient")
  elseif r.Path == "/intercept" then
    error("the transient hook must not run after the singleton intercepted")
  end
end

function onHttpResponse(res)
  if res.Path == "/echo/order" then
    res:AddHeader("X-Resp-Order", tostring(res.Headers["x-resp-order"]) .. ",transient")
  elseif res.Path == "/echo/scope" then
    res:AddHeader("X-Same-Engine", tostring(mark))  -- set by this request's onHttpRequest
  end
end
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: LocalUpstream) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("gw-hooks"),
        settings={"Dicom": {"Port": 0}, "Upstream": {"Url": upstream.url}},
        scripts={"main.lua": MAIN, "main-transient.lua": TRANSIENT},
    )
    gateway.start()
    yield gateway
    gateway.stop()


def echoed(r: requests.Response) -> list[list[str]]:
    assert r.status_code == 200, r.text
    return r.json()["headers"]


# --------------------------------------------------------------------------- onHttpRequest
def test_intercept_with_status_body_and_headers(gw: GatewayProcess, upstream: LocalUpstream) -> None:
    upstream.reset()
    r = gw.get("/intercept")
    assert r.status_code == 418
    assert r.json() == {"intercepted": True}
    assert r.headers["X-Intercepted"] == "yes"
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Content-Length"] == str(len(r.content))
    r = gw.get("/intercept-default")
    assert (r.status_code, r.text) == (200, "plain answer")
    assert r.headers["Content-Type"].startswith("text/plain")
    r = gw.post("/intercept-setstatus", data=b"ignored body")
    assert (r.status_code, r.text) == (403, "forbidden by script")
    assert upstream.paths_seen() == [], "an intercepted request went upstream"
    # returning false (or nothing) does not intercept: the request goes upstream as is
    r = gw.get("/echo/return-false")
    assert r.status_code == 200 and r.json()["path"] == "/echo/return-false"


def test_request_header_edits_reach_the_upstream(gw: GatewayProcess) -> None:
    r = gw.get("/echo/edit", headers={"X-Remove-Me": "secret", "X-Replace": "old", "X-Keep": "kept"})
    seen = echoed(r)
    assert header_values(seen, "x-added") == ["added"]
    assert header_values(seen, "x-remove-me") == []
    assert header_values(seen, "x-replace") == ["new"]
    assert header_values(seen, "x-keep") == ["kept"]
    # the script's own view of Headers follows its edits
    assert r.headers["X-Seen-After-Add"] == "added"
    assert r.headers["X-Seen-After-Remove"] == "nil"


def test_colon_and_dot_call_styles(gw: GatewayProcess) -> None:
    r = gw.get("/echo/styles", headers={"X-Gone-Dot": "1", "X-Gone-Colon": "1"})
    seen = echoed(r)
    assert header_values(seen, "x-colon") == ["1"] and header_values(seen, "x-dot") == ["2"]
    assert header_values(seen, "x-gone-dot") == [] and header_values(seen, "x-gone-colon") == []
    assert r.headers["X-RColon"] == "3" and r.headers["X-RDot"] == "4"


def test_headers_case_insensitive_and_iterable(gw: GatewayProcess) -> None:
    status, headers, _ = raw_request(gw.url, "GET", "/echo/headers?a=1&b=two", [
        ("Host", "gw.example"), ("X-Mixed-Case", "MiXeD"), ("X-Twice", "one"), ("X-Twice", "two"),
    ])
    assert status == 200
    got = {k.lower(): v for k, v in headers}
    assert got["x-lookups"] == "MiXeD|MiXeD|MiXeD|one, two|nil"
    names = got["x-names"].split(",")
    assert {"host", "x-mixed-case", "x-twice"} <= set(names) and names == sorted(names)
    assert got["x-req"] == "http|GET|/echo/headers|a=1&b=two|127.0.0.1"


# --------------------------------------------------------------------------- onHttpResponse
def test_response_hook_edits_status_and_headers(gw: GatewayProcess) -> None:
    r = gw.post("/echo/resp-edit", data=b"x")
    assert r.status_code == 203
    assert r.headers["X-Was"] == "200 s3cret"
    assert r.headers["X-Resp-Added"] == "http POST /echo/resp-edit"
    assert r.headers["X-Resp-Dot"] == "dot"
    assert "X-Upstream-Secret" not in r.headers
    assert r.headers["X-Echo"] == "1"  # untouched headers pass
    assert r.json()["method"] == "POST"  # the body is the upstream's


def test_response_hook_replaces_the_body(gw: GatewayProcess) -> None:
    r = gw.get("/echo/resp-body")
    assert (r.status_code, r.text) == (200, "replaced; upstream said 200")
    assert r.headers["Content-Length"] == str(len(r.content))
    r = gw.get("/status/404")
    assert (r.status_code, r.json()) == (200, {"mapped": True})
    assert r.headers["Content-Type"] == "application/json"
    # a chunked upstream body is replaced whole: fixed length, no chunked framing left
    status, headers, body = raw_request(gw.url, "GET", "/chunked?size=200000")
    assert (status, body) == (200, b"short")
    assert header_values(headers, "content-length") == ["5"]
    assert header_values(headers, "transfer-encoding") == []


def test_singleton_runs_before_transient_both_ways(gw: GatewayProcess) -> None:
    r = gw.get("/echo/order")
    assert header_values(echoed(r), "x-order") == ["singleton,transient"]
    assert r.headers["X-Resp-Order"] == "singleton,transient"
    # a singleton that intercepts ends the chain (the transient hook would raise)
    assert gw.get("/intercept").status_code == 418


def test_hooks_wrap_the_gateways_own_routes(gw: GatewayProcess) -> None:
    r = gw.get("/dicomproxy/health")
    assert r.status_code == 200 and r.headers["X-Hooked"] == "yes"
    scripts = r.json()["scripts"]["scripts"]
    assert {s["kind"]: s["callbacks"] for s in scripts if s["kind"] != "background"} == {
        "singleton": ["onHttpRequest", "onHttpResponse"], "transient": ["onHttpRequest", "onHttpResponse"]}


def test_one_transient_engine_serves_both_hooks_of_a_request(gw: GatewayProcess) -> None:
    for i in range(3):
        r = gw.get(f"/echo/scope?n={i}")
        assert r.headers["X-Same-Engine"] == f"/echo/scope?n={i}"


def test_large_body_streams_through_both_hooks_with_flat_memory(gw: GatewayProcess) -> None:
    """With onHttpRequest and onHttpResponse defined (not replacing the body), bodies still stream."""
    assert gw.proc is not None
    size = 150 * BLOCK
    with RssSampler(gw.proc.pid) as rss:
        r = requests.get(f"{gw.url}/big?size={size}&mode=chunked", stream=True, timeout=60)
        assert r.status_code == 200 and r.headers["Transfer-Encoding"] == "chunked"
        length, chunks = 0, 0
        for chunk in r.iter_content(None):
            length += len(chunk)
            chunks += 1
        r = requests.post(f"{gw.url}/sink", data=pattern_blocks(size), timeout=60)
    assert length == size and chunks > 10
    assert r.json()["length"] == size
    assert rss.growth_mb < 60, f"gateway RSS grew {rss.growth_mb:.0f} MB streaming 2 x 150 MiB through hooks"
