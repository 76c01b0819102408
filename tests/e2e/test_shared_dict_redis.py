"""SharedDict shared by replicas through Redis (``Cluster:Redis``, issue 14 item 1): real gateway
processes on one Debian redis-server.

* two replicas whose Lua increments one counter, 100 times in total, alternately: every answer
  is a different number, and both read exactly 100;
* a value set with a TTL on one replica is read on the other, and expires there (Redis's expiry);
* ``Server:Workers: 2`` with Redis: the store is Redis (not the host's LMDB file), so the
  workers of one replica and another replica count together;
* Redis killed: a SharedDict call fails within seconds with an error naming ``Cluster:Redis``,
  the gateway keeps serving, and counts again once Redis is back.

Units of the store: tests/scripting/test_shared_redis.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

from tests.peers import GatewayProcess, RedisServer, wait_until

GatewayFactory = Callable[..., GatewayProcess]

MAIN = """
function onHttpRequest(r)
  if r.Path == "/count" then
    r:ResponseWrite(tostring(SharedDict:incr("hits", 1, 0))) return true
  end
  if r.Path == "/hits" then r:ResponseWrite(tostring(SharedDict:get("hits") or 0)) return true end
  if r.Path == "/put" then
    SharedDict:set(r.Headers["x-key"], r.Headers["x-value"], tonumber(r.Headers["x-ttl"]))
    r:ResponseWrite("ok") return true
  end
  if r.Path == "/read" then r:ResponseWrite(SharedDict:get(r.Headers["x-key"]) or "(nil)") return true end
  if r.Path == "/guarded" then
    local ok, err = pcall(SharedDict.incr, "hits", 1, 0)
    r:ResponseWrite(ok and "counted" or tostring(err)) return true
  end
end
"""


def replica(gateway_factory: GatewayFactory, redis_server: RedisServer, **extra: Any) -> GatewayProcess:
    settings = {"Dicom": {"Port": 0}, "Cluster": {"Redis": redis_server.url}, **extra}
    return gateway_factory(settings, {"main.lua": MAIN}, register_modality=None)


def fresh_get(gw: GatewayProcess, path: str, **headers: str) -> requests.Response:
    """On a new connection, so that with several workers any of them may answer."""
    resp = requests.get(f"{gw.url}{path}", timeout=15, headers={"Connection": "close", **headers})
    assert resp.status_code == 200, (resp.status_code, resp.text)
    return resp


def test_two_replicas_count_one_counter_exactly(gateway_factory: GatewayFactory, redis_server: RedisServer) -> None:
    a, b = replica(gateway_factory, redis_server), replica(gateway_factory, redis_server)
    seen = [int(fresh_get(a if i % 2 == 0 else b, "/count").text) for i in range(100)]
    assert sorted(seen) == list(range(1, 101)), seen  # each increment saw its own number: atomic
    assert seen == list(range(1, 101))  # and, alternating one at a time, in order
    assert fresh_get(a, "/hits").text == "100" and fresh_get(b, "/hits").text == "100"
    assert redis_server.client().hget("dicomproxy:{shared}:default:hits", "v") == "100"


def test_a_ttl_set_on_one_replica_expires_on_the_other(gateway_factory: GatewayFactory,
                                                       redis_server: RedisServer) -> None:
    a, b = replica(gateway_factory, redis_server), replica(gateway_factory, redis_server)
    fresh_get(a, "/put", **{"x-key": "brief", "x-value": "from A", "x-ttl": "1.5"})
    fresh_get(a, "/put", **{"x-key": "kept", "x-value": "from A", "x-ttl": "0"})
    assert fresh_get(b, "/read", **{"x-key": "brief"}).text == "from A"
    assert 0 < redis_server.client().pttl("dicomproxy:{shared}:default:brief") <= 1500
    wait_until(lambda: fresh_get(b, "/read", **{"x-key": "brief"}).text == "(nil)", timeout=10,
               what="the entry expired on replica B")
    assert fresh_get(b, "/read", **{"x-key": "kept"}).text == "from A"


def test_workers_and_replicas_share_redis(gateway_factory: GatewayFactory, redis_server: RedisServer) -> None:
    a = replica(gateway_factory, redis_server, Server={"Workers": 2})
    wait_until(lambda: fresh_get(a, "/dicomproxy/health").json()["workers"]["running"] == 2, timeout=30,
               what="both workers of replica A running")
    b = replica(gateway_factory, redis_server)
    for i in range(100):
        fresh_get(a if i % 2 == 0 else b, "/count")
    answered: set[int] = set()

    def both_workers_answered() -> bool:  # each read on a new connection: either worker of A may take it
        answer = fresh_get(a, "/dicomproxy/health").json()["workers"]
        answered.add(answer["index"])
        assert fresh_get(a, "/hits").text == "100"
        return len(answered) == 2

    wait_until(both_workers_answered, timeout=20, what="both workers of replica A answering")
    assert fresh_get(b, "/hits").text == "100"
    assert not (a.data_dir / "run" / "shared").exists()  # not the host's LMDB file: Redis


def test_redis_down_fails_the_call_within_seconds_and_the_gateway_serves_on(
    gateway_factory: GatewayFactory, redis_server: RedisServer,
) -> None:
    a = replica(gateway_factory, redis_server)
    assert fresh_get(a, "/count").text == "1"
    redis_server.kill()
    started = time.monotonic()
    failed = requests.get(f"{a.url}/count", timeout=30)
    assert time.monotonic() - started < 8
    assert failed.status_code == 500
    guarded = fresh_get(a, "/guarded").text  # a script that pcall()s it sees the error
    assert "Cluster:Redis" in guarded and f"127.0.0.1:{redis_server.port}" in guarded, guarded
    assert requests.get(f"{a.url}/dicomproxy/health/live", timeout=5).status_code == 200
    redis_server.start()  # same port, empty
    wait_until(lambda: fresh_get(a, "/guarded").text == "counted", timeout=15, what="counting again")
