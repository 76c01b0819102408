"""Orthanc Lua scripts, unchanged, through the real stack: a real Orthanc, the gateway as a
process, dcmtk storescp as the routing destination, a small aiohttp server for HttpGet & co.

Scripts marked "verbatim" are copied from the Orthanc book (shared/seeds/orthanc-lua-scripting.txt).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import pydicom
import pytest
from aiohttp import web

from dicomproxy.scripting.orthanc.pacs import orthanc_id
from tests.peers import free_port, run_dcmtk, wait_until

FAST = {"Orthanc": {"PollIntervalSeconds": 0.2}, "Lua": {"ReloadIntervalMs": 200}}


# --------------------------------------------------------------------------- a local web service
class WebService:
    """An aiohttp server in its own thread: ``/record/<name>`` keeps what scripts post,
    ``/echo`` answers what it received, ``/slow`` waits 3 s, ``/status/<n>`` answers n."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.records: list[tuple[str, str]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def names(self) -> list[str]:
        return [name for name, _ in self.records]

    def bodies(self, name: str) -> list[str]:
        return [body for n, body in self.records if n == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 15) -> list[str]:
        return wait_until(lambda: len(b := self.bodies(name)) >= count and b, timeout=timeout,
                          what=f"{count} x {name!r} at the web service (got {self.records})")

    def _app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            self.records.append((request.match_info["name"], (await request.read()).decode("utf-8", "replace")))
            return web.Response(text="recorded")

        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            return web.json_response({
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body.hex(),
            })

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(3)
            return web.Response(text="late")

        async def status(request: web.Request) -> web.Response:
            return web.Response(status=int(request.match_info["code"]), text="status")

        app = web.Application()
        app.router.add_route("*", "/record/{name}", record)
        app.router.add_route("*", "/echo", echo)
        app.router.add_route("*", "/slow", slow)
        app.router.add_route("*", "/status/{code}", status)
        return app

    def start(self) -> WebService:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            runner = web.AppRunner(self._app())
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self.thread = threading.Thread(target=run, name="web-service", daemon=True)
        self.thread.start()
        if not ready.wait(10):
            pytest.fail("the test web service did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def service() -> Any:
    svc = WebService().start()
    yield svc
    svc.stop()


def upload(orthanc: Any, dicom_samples: Any, **tags: Any) -> tuple[str, str]:
    """Store one generated instance in Orthanc directly (REST); returns (orthanc id, SOP UID)."""
    tags.setdefault("patient_id", "PCOMPAT")
    tags.setdefault("patient_name", "Doe^John")
    data, sop = dicom_samples.make_instance(**tags)
    return orthanc.upload(data)["ID"], sop


# --------------------------------------------------------------------------- IncomingHttpRequestFilter
DOC_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  -- Only allow GET requests for non-admin users

  if method == 'GET' then
    return true
  elseif username == 'admin' then
    return true
  else
    return false
  end
end
"""  # verbatim

TOKEN_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  print('filter', method, uri, ip, username, httpHeaders['x-token'])
  return httpHeaders['x-token'] == 'secret'
end
"""


def test_incoming_http_request_filter(gateway_factory: Any, orthanc: Any) -> None:
    users = {"admin": "admin-pw", "alice": "alice-pw"}
    gw = gateway_factory({**FAST, "Authentication": {"Users": users}}, {"main.lua": DOC_FILTER})
    alice, admin = ("alice", "alice-pw"), ("admin", "admin-pw")

    r = gw.get("/system", auth=alice)
    assert r.status_code == 200 and r.json()["DicomAet"] == orthanc.aet
    r = gw.post("/tools/lookup", data="1.2.3", auth=alice)
    assert r.status_code == 403, r.text
    assert r.json()["hook"] == "IncomingHttpRequestFilter"
    assert gw.request("DELETE", "/patients/0000", auth=alice).status_code == 403
    assert gw.post("/tools/lookup", data="1.2.3", auth=admin).status_code == 200
    assert gw.get("/system").status_code == 401  # authentication comes first
    assert gw.get("/dicomproxy/health").status_code in (200, 503)  # never filtered

    # The filter sees the method, the path, the client's IP, the user and lower-cased headers.
    gw.write_script("main.lua", TOKEN_FILTER)
    wait_until(lambda: gw.get("/system", auth=alice).status_code == 403, timeout=10, what="the token filter")
    r = gw.get("/system", auth=alice, headers={"X-Token": "secret"})
    assert r.status_code == 200
    gw.wait_for_log("Lua says: filter, GET, /system, 127.0.0.1, alice, secret")

    # A filter that answers neither true nor false is a script failure (Orthanc: a Lua error).
    gw.write_script("main.lua", "function IncomingHttpRequestFilter() return nil end")
    wait_until(lambda: gw.get("/system", auth=alice).status_code == 500, timeout=10, what="the nil filter")
    assert "must return true or false" in gw.get("/system", auth=alice).json()["message"]


# --------------------------------------------------------------------------- OnStoredInstance
ON_STORED = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  local instance = ParseJson(RestApiGet('/instances/' .. instanceId))
  print('Stored ' .. instanceId .. ' of ' .. tags['PatientName'] .. ' in series ' .. instance['ParentSeries']
        .. ' from ' .. origin['RequestOrigin'] .. ' received ' .. metadata['ReceptionDate'])
  PrintRecursive(origin)
end
"""


def test_on_stored_instance_calls_rest_api_and_survives_restart(
    gateway_factory: Any, fresh_orthanc: Any, dicom_samples: Any
) -> None:
    orthanc = fresh_orthanc
    before, _ = upload(orthanc, dicom_samples, patient_name="Before^Gateway")
    gw = gateway_factory(FAST, {"main.lua": ON_STORED})

    iid, sop = upload(orthanc, dicom_samples, patient_name="Doe^John")
    info = orthanc.rest_get(f"/instances/{iid}")
    tags = orthanc.rest_get(f"/instances/{iid}/simplified-tags")
    assert orthanc_id(tags["PatientID"], tags["StudyInstanceUID"], tags["SeriesInstanceUID"], sop) == iid
    series = info["ParentSeries"]
    log = gw.wait_for_log(f"Lua says: Stored {iid} of Doe^John in series {series} from RestApi received 2")
    assert "[RequestOrigin] string RestApi" in log  # PrintRecursive
    assert "[RemoteIp] string 127.0.0.1" in log
    assert f"Stored {before}" not in log  # stored before the gateway started: not news

    # Through the gateway's proxy too.
    data, _ = dicom_samples.make_instance(patient_id="PCOMPAT", patient_name="Via^Gateway")
    proxied = gw.post("/instances", data=data).json()["ID"]
    gw.wait_for_log(f"Stored {proxied} of Via^Gateway")

    # A restart resumes after the last change: no replay, and what arrived meanwhile is delivered.
    gw.stop()
    during, _ = upload(orthanc, dicom_samples, patient_name="While^Down")
    gw.start()
    gw.wait_for_log(f"Stored {during} of While^Down")
    # Changes are delivered one by one, in the PACS's order: once a later instance's callback
    # ran, any (wrong) replay of the earlier ones would have run before it.
    marker, _ = upload(orthanc, dicom_samples, patient_name="Marker^Last")
    log = gw.wait_for_log(f"Stored {marker} of Marker^Last")
    assert log.count(f"Lua says: Stored {iid}") == 1
    assert log.count(f"Lua says: Stored {proxied}") == 1
    assert log.count(f"Lua says: Stored {during}") == 1


# --------------------------------------------------------------------------- routing helpers
DOC_MODIFY_ROUTE = """
function OnStoredInstance(instanceId, tags, metadata)
   -- Ignore the instances that result from a modification to avoid
   -- infinite loops
   if (metadata['ModifiedFrom'] == nil and
       metadata['AnonymizedFrom'] == nil) then

      -- The tags to be replaced
      local replace = {}
      replace['StationName'] = 'My Medical Device'

      -- The tags to be removed
      local remove = { 'MilitaryRank' }

      -- Modify the instance, send it, then delete the modified instance
      Delete(SendToModality(ModifyInstance(instanceId, replace, remove, true), 'sample'))

      -- Delete the original instance
      Delete(instanceId)
   end
end
"""  # verbatim

DOC_AUTOROUTING_MODIFICATION = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   -- Ignore the instances that result from the present Lua script to
   -- avoid infinite loops
   if origin['RequestOrigin'] ~= 'Lua' then

      -- The tags to be replaced
      local replace = {}
      replace['StationName'] = 'My Medical Device'
      replace['0031-1020'] = 'Some private tag'

      -- The tags to be removed
      local remove = { 'MilitaryRank' }

      -- Modify the instance
      local command = {}
      command['Replace'] = replace
      command['Remove'] = remove
      local modifiedFile = RestApiPost('/instances/' .. instanceId .. '/modify', DumpJson(command, true))

      -- Upload the modified instance to the Orthanc database so that
      -- it can be sent by Orthanc to other modalities
      local modifiedId = ParseJson(RestApiPost('/instances/', modifiedFile)) ['ID']

      -- Send the modified instance to another modality
      RestApiPost('/modalities/sample/store', modifiedId)

      -- Delete the original and the modified instances
      RestApiDelete('/instances/' .. instanceId)
      RestApiDelete('/instances/' .. modifiedId)
   end
end
"""  # verbatim


@pytest.mark.parametrize("script", [DOC_MODIFY_ROUTE, DOC_AUTOROUTING_MODIFICATION], ids=["ModifyInstance", "RestApi"])
def test_modify_and_route_doc_scripts(
    script: str, fresh_orthanc: Any, storescp_factory: Any, gateway_factory: Any, dicom_samples: Any
) -> None:
    orthanc = fresh_orthanc
    scp = storescp_factory()
    orthanc.set_modality("sample", scp.aet, scp.host, scp.port)
    gw = gateway_factory(FAST, {"main.lua": script})

    _, sop = upload(orthanc, dicom_samples, StationName="OLD", MilitaryRank="CPT")
    files = scp.wait_for_files(1, timeout=20)
    ds = pydicom.dcmread(files[0])
    assert ds.StationName == "My Medical Device"
    assert "MilitaryRank" not in ds
    assert ds.SOPInstanceUID != sop  # a modified copy, as Orthanc makes it
    orthanc_empty = wait_until(lambda: orthanc.instance_count() == 0, timeout=15, what="both instances deleted")
    assert orthanc_empty
    # The loop guard: the modified copy (stored, then deleted) is not routed again. Changes are
    # delivered in order, so once a later instance has been routed, that decision was made.
    upload(orthanc, dicom_samples, StationName="LATER")
    files = scp.wait_for_files(2, timeout=20)
    assert len(files) == 2 and sorted(pydicom.dcmread(f).StationName for f in files) == ["My Medical Device"] * 2
    wait_until(lambda: orthanc.instance_count() == 0, timeout=15, what="the later instance deleted as well")
    assert len(scp.files()) == 2
    assert "OnStoredInstance in singleton engine failed" not in gw.log_text()


# --------------------------------------------------------------------------- functions, probed over HTTP
PROBE = r"""
local routes = {}

routes['/t/json'] = function(req)
  local t = ParseJson('{"PatientID":"00123","Count":3,"Ratio":0.5,"Tags":["A","B"],"Empty":{},"Null":null}')
  local out = {
    dumped = DumpJson({PatientID = '00123', n = 1, f = 1.5, list = {1, 2, '3'}, nested = {x = {}}, b = true}),
    kept = DumpJson({PatientID = '00123', n = 1, s = 'abc'}, true),
    empty = DumpJson({}),
    roundtrip = DumpJson(ParseJson(DumpJson({a = {1, 2, {b = 'c'}}, d = 'e'}, true)), true),
    parsed = t.PatientID .. '|' .. math.type(t.Count) .. '|' .. t.Ratio .. '|' .. #t.Tags .. '|' .. tostring(t.Null),
    invalid = tostring(ParseJson('{not json')),
  }
  return DumpJson(out, true)
end

routes['/t/config'] = function(req) return DumpJson(GetOrthancConfiguration(), true) end

routes['/t/http'] = function(req)
  local base = req.Headers['x-service']
  local out = {}
  SetHttpCredentials('user', 'pwd')
  out.get = ParseJson(HttpGet(base .. '/echo?x=1', {['X-Custom'] = 'yes'}))
  out.post = ParseJson(HttpPost(base .. '/echo', 'hello', {['Content-Type'] = 'text/plain'}))
  out.put = ParseJson(HttpPut(base .. '/echo', string.char(0, 255, 1)))
  out.delete = HttpDelete(base .. '/echo')
  out.missing = tostring(HttpGet(base .. '/status/404'))
  out.refused = tostring(HttpGet('http://127.0.0.1:1/'))
  return DumpJson(out, true)
end

routes['/t/timeout'] = function(req)
  SetHttpTimeout(1)
  return tostring(HttpGet(req.Headers['x-service'] .. '/slow'))
end

routes['/t/rest'] = function(req)
  local id = req.Headers['x-id']
  local out = {}
  out.missing = tostring(RestApiGet('/instances/does-not-exist'))
  out.deleteMissing = tostring(RestApiDelete('/instances/does-not-exist'))
  out.file = #RestApiGet('/instances/' .. id .. '/file')
  out.peer = SendToPeer(id, 'peer1')
  out.modality = tostring(SendToModality(id, req.Headers['x-modality']))
  return DumpJson(out, true)
end

routes['/t/send-unknown'] = function(req) return SendToModality(req.Headers['x-id'], 'no-such-modality') end

function onHttpRequest(req)
  local route = routes[req.Path]
  if route == nil then return false end
  req:ResponseWrite(route(req))
  return true
end
"""


def test_functions(
    fresh_orthanc: Any, orthanc_factory: Any, storescp_factory: Any, service: Any, gateway_factory: Any,
    dicom_samples: Any,
) -> None:
    orthanc = fresh_orthanc
    peer = orthanc_factory()
    orthanc.rest_put("/peers/peer1", json={"Url": peer.http_url})
    scp = storescp_factory()
    orthanc.set_modality("probe-scp", scp.aet, scp.host, scp.port)
    gw = gateway_factory(FAST, {"main.lua": PROBE})

    # DumpJson / ParseJson, Orthanc's semantics
    out = gw.get("/t/json").json()
    assert json.loads(out["dumped"]) == {"PatientID": 123, "n": 1, "f": 1.5, "list": [1, 2, 3],
                                         "nested": {"x": []}, "b": True}
    assert out["dumped"].startswith('{"PatientID":123,"b":true,')  # compact, keys sorted
    assert json.loads(out["kept"]) == {"PatientID": "00123", "n": "1", "s": "abc"}
    assert out["empty"] == "[]"
    assert json.loads(out["roundtrip"]) == {"a": ["1", "2", {"b": "c"}], "d": "e"}
    assert out["parsed"] == "00123|integer|0.5|2|nil"
    assert out["invalid"] == "nil"

    # GetOrthancConfiguration: the PACS's view plus the gateway's
    config = gw.get("/t/config").json()
    assert config["DicomAet"] == orthanc.aet and int(config["DicomPort"]) == orthanc.dicom_port
    assert "probe-scp" in config["DicomModalities"] and "peer1" in config["OrthancPeers"]
    assert config["DicomProxy"]["Upstream"]["Url"] == orthanc.http_url

    # HttpGet & co against a web service, with credentials and headers
    out = gw.get("/t/http", headers={"X-Service": service.url}).json()
    assert out["get"]["method"] == "GET" and out["get"]["path"] == "/echo?x=1"
    assert out["get"]["headers"]["x-custom"] == "yes"
    assert out["get"]["headers"]["authorization"] == "Basic dXNlcjpwd2Q="  # user:pwd
    assert out["post"]["method"] == "POST" and bytes.fromhex(out["post"]["body"]) == b"hello"
    assert bytes.fromhex(out["put"]["body"]) == b"\x00\xff\x01"  # binary bodies pass byte for byte
    assert out["delete"] == "SUCCESS"
    assert out["missing"] == "nil" and out["refused"] == "nil"
    log = gw.wait_for_log("Error in HttpGet() for URL " + service.url + "/status/404")
    assert "HTTP 404" in log

    # SetHttpTimeout is honoured: nil after ~1 s, not the service's 3 s
    started = time.monotonic()
    r = gw.get("/t/timeout", headers={"X-Service": service.url})
    assert r.text == "nil" and time.monotonic() - started < 2.5
    gw.wait_for_log("no answer within 1 s (SetHttpTimeout)")

    # RestApi*: nil on failure (logged with method, URL and status); binary answers intact;
    # SendToPeer / SendToModality return the id for chaining
    iid, _ = upload(orthanc, dicom_samples)
    size = len(orthanc.request("GET", f"/instances/{iid}/file").content)
    out = gw.get("/t/rest", headers={"X-Id": iid, "X-Modality": "probe-scp"}).json()
    assert out["missing"] == "nil" and out["deleteMissing"] == "nil"
    assert int(out["file"]) == size
    assert out["peer"] == iid and out["modality"] == iid
    assert peer.instances() == [iid]
    scp.wait_for_files(1)
    log = gw.wait_for_log("Error in RestApiGet() for URI /instances/does-not-exist")
    assert f"GET {orthanc.http_url}/instances/does-not-exist -> HTTP 404" in log

    # A failed routing step is a Lua error naming what failed (the chain must stop)
    r = gw.get("/t/send-unknown", headers={"X-Id": iid})
    assert r.status_code == 500
    message = r.json()["message"]
    assert "SendToModality" in message and "/modalities/no-such-modality/store -> HTTP 404" in message


# --------------------------------------------------------------------------- lifecycle and heartbeat
LIFECYCLE = """
local base = Config['ExtraConfig:Service']
function Initialize() HttpPost(base .. '/record/init', 'VERSION') end
function Finalize() HttpPost(base .. '/record/fini', 'VERSION') end
function OnHeartBeat() HttpPost(base .. '/record/beat', 'VERSION') end
"""


def test_initialize_finalize_and_heartbeat(gateway_factory: Any, service: Any) -> None:
    settings = {**FAST, "ExtraConfig": {"Service": service.url}, "Orthanc": {"PollIntervalSeconds": 0.2,
                                                                       "LuaHeartBeatPeriod": 0.3}}
    gw = gateway_factory(settings, {"main.lua": LIFECYCLE.replace("VERSION", "v1")})
    assert service.wait_for("init") == ["v1"]
    service.wait_for("beat", 2)  # every 0.3 s

    gw.write_script("main.lua", LIFECYCLE.replace("VERSION", "v2"))
    service.wait_for("init", 2)
    assert service.bodies("fini") == ["v1"]
    sequence = [(n, b) for n, b in service.records if n != "beat"]
    assert sequence == [("init", "v1"), ("fini", "v1"), ("init", "v2")]
    wait_until(lambda: service.bodies("beat")[-1] == "v2", timeout=5, what="a heartbeat from v2")

    assert gw.stop() in (0, -signal.SIGTERM)  # graceful, not killed
    assert service.bodies("fini") == ["v1", "v2"]  # Finalize ran before the process ended


# --------------------------------------------------------------------------- change callbacks
CHANGES = """
local base = Config['ExtraConfig:Service']
local function record(name, text) HttpPost(base .. '/record/' .. name, text) end
function OnStableSeries(id, tags, metadata) record('stable-series', id .. ' ' .. tags['SeriesDescription']) end
function OnStableStudy(id, tags, metadata) record('stable-study', id .. ' ' .. tags['StudyDescription']) end
function OnStablePatient(id, tags, metadata) record('stable-patient', id .. ' ' .. tags['PatientName']) end
function OnUpdatedInstance(id) record('updated-instance', id) end
function OnDeletedInstance(id) record('deleted-instance', id) end
function OnDeletedSeries(id) record('deleted-series', id) end
function OnDeletedStudy(id) record('deleted-study', id) end
function OnDeletedPatient(id) record('deleted-patient', id) end
function OnJobSubmitted(id) record('job-submitted', id) end
function OnJobSuccess(id) record('job-success', id) end
function OnJobFailure(id) record('job-failure', id) end
"""


def test_change_callbacks(orthanc_factory: Any, service: Any, gateway_factory: Any, dicom_samples: Any) -> None:
    orthanc = orthanc_factory(extra_config={"UserMetadata": {"Reviewed": 1024}, "StableAge": 1})
    gw = gateway_factory({**FAST, "ExtraConfig": {"Service": service.url}}, {"main.lua": CHANGES}, orthanc=orthanc)
    series = dicom_samples.make_study(gw.workdir / "study", n_series=1, n_instances=2, patient_name="Stable^Pat",
                                      StudyDescription="Study X", SeriesDescription="Series Y")
    ids = [orthanc.upload(path)["ID"] for path, _ in series]
    first = orthanc.rest_get(f"/instances/{ids[0]}")
    series_id, study_id = first["ParentSeries"], orthanc.rest_get(f"/series/{first['ParentSeries']}")["ParentStudy"]
    patient_id = orthanc.rest_get(f"/studies/{study_id}")["ParentPatient"]

    assert service.wait_for("stable-series") == [f"{series_id} Series Y"]
    assert service.wait_for("stable-study") == [f"{study_id} Study X"]
    assert service.wait_for("stable-patient") == [f"{patient_id} Stable^Pat"]

    orthanc.rest_put(f"/instances/{ids[0]}/metadata/Reviewed", data="yes")
    assert service.wait_for("updated-instance") == [ids[0]]

    # Jobs: one that succeeds, one that fails (a modality that is not listening)
    orthanc.set_modality("dead", "DEAD", "127.0.0.1", free_port())
    ok_job = orthanc.rest_post("/tools/create-archive", json={"Resources": [study_id], "Asynchronous": True})["ID"]
    bad_job = orthanc.rest_post("/modalities/dead/store", json={"Resources": [ids[0]], "Asynchronous": True})["ID"]
    service.wait_for("job-success")
    service.wait_for("job-failure")
    assert ok_job in service.bodies("job-success") and bad_job in service.bodies("job-failure")
    assert {ok_job, bad_job} <= set(service.bodies("job-submitted"))

    # Deletions through the gateway: Orthanc does not log them, the gateway reports them,
    # including the parents Orthanc removes when they become empty.
    assert gw.request("DELETE", f"/instances/{ids[0]}").status_code == 200
    assert service.wait_for("deleted-instance") == [ids[0]]
    assert gw.request("DELETE", f"/instances/{ids[1]}").status_code == 200
    assert service.wait_for("deleted-patient") == [patient_id]
    assert service.bodies("deleted-instance") == ids
    assert service.bodies("deleted-series") == [series_id]
    assert service.bodies("deleted-study") == [study_id]
    order = [n for n, _ in service.records if n.startswith("deleted-")]
    assert order[-3:] == ["deleted-series", "deleted-study", "deleted-patient"]


# --------------------------------------------------------------------------- the gateway's own DICOM side
def test_on_stored_instance_once_for_instances_through_the_dicom_side(
    fresh_orthanc: Any, gateway_factory: Any, sample_dir: Any, dicom_samples: Any
) -> None:
    """The Orthanc layer calls OnStoredInstance with the modality's origin when the DICOM side
    reports (its "instance stored" hook) that the PACS accepted a forwarded instance; the change
    feed must not call it a second time for the same instance."""
    script = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  print('Stored ' .. tags['PatientName'] .. ' from ' .. origin['RequestOrigin'] .. ' ' .. tostring(origin['RemoteAet']))
end
"""
    gw = gateway_factory(FAST, {"main.lua": script})
    path, _ = dicom_samples.make_instance(sample_dir / "a.dcm", patient_id="PDICOM", patient_name="Via^Dicom")
    run_dcmtk("storescu", "-aet", "MODALITY", "-aec", gw.aet, "127.0.0.1", str(gw.dicom_port), str(path))
    fresh_orthanc.wait_for_instances(1)
    gw.wait_for_log("Lua says: Stored Via^Dicom from DicomProtocol MODALITY")
    # The feed reports changes in order: once it reported a later upload, it is past the forwarded one.
    upload(fresh_orthanc, dicom_samples, patient_name="Later^Upload")
    gw.wait_for_log("Lua says: Stored Later^Upload from RestApi nil")
    assert gw.log_text().count("Lua says: Stored Via^Dicom") == 1
