"""Orthanc compatibility: Orthanc Lua scripts run unchanged in DicomProxy's engines.

The functions (every engine): ``RestApiGet/Post/Put/Delete`` against the PACS's REST API
(``Upstream:Url``), ``HttpGet/Post/Put/Delete`` with ``SetHttpCredentials``/``SetHttpTimeout``
(per engine), ``ParseJson``, ``DumpJson``, ``PrintRecursive``, ``GetOrthancConfiguration``, and
the routing helpers ``SendToModality``, ``SendToPeer``, ``ModifyInstance``, ``Delete``, and the
rest of Orthanc's ``Toolbox.lua`` prelude (``ModifyResource``, ``CallSystem``, ``_InitializeJob``,
``_AccessJob``: :mod:`.toolbox`). Orthanc's ``LuaScripts`` option is ``Orthanc:LuaScripts`` (loaded
into the singleton by the script host).

The callbacks: ``Initialize``/``Finalize`` around the singleton script's life (load, hot reload,
shutdown); ``IncomingHttpRequestFilter`` on every HTTP request (:mod:`.orthanc_filter`); the
change callbacks from the PACS's own records (:mod:`.orthanc_changes`), and ``OnStoredInstance``
for what the gateway's DICOM side forwarded (:mod:`.dicom_stored`, from the DICOM side's
"instance stored" hook); ``OnHeartBeat`` every ``Orthanc:LuaHeartBeatPeriod`` seconds.
``ReceivedInstanceFilter``, ``ReceivedCStoreInstanceFilter`` and the C-FIND filters
``IncomingFindRequestFilter``, ``IncomingWorklistRequestFilter`` and ``OutgoingFindRequestFilter``
fire on the DICOM side (:mod:`dicomproxy.dicom`, :mod:`dicomproxy.dicom.qr.hooks`);
``ReceivedInstanceFilter`` also on HTTP uploads (``POST /instances``, STOW-RS: :mod:`.upload_filter`).

Semantics follow Orthanc's source where its book is silent: ``RestApi*`` and ``Http*`` return
``nil`` on failure and log why (method, URL, status); the routing helpers raise a Lua error
instead, because in Orthanc a failed step ends the chain (``Delete(SendToModality(id, 'x'))``
must not delete what was not sent). See docs/orthanc-compat.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from dicomproxy_middleware import LuaEngine, LuaError, LuaExportError
from pydicom.datadict import dictionary_VR

from dicomproxy.dicom import datasets
from dicomproxy.dicom.hooks import InstanceStored
from dicomproxy.host import Host
from dicomproxy.scripting.orthanc import upload_filter
from dicomproxy.scripting.orthanc.changes import (
    ChangeFeed,
    CursorFile,
    Deletions,
    EventPump,
    JobWatcher,
    LuaStored,
    OrthancEvents,
    origin_from_metadata,
)
from dicomproxy.scripting.orthanc.dicom_stored import DicomForwarded
from dicomproxy.scripting.orthanc.execute_script import PATH as EXECUTE_PATH
from dicomproxy.scripting.orthanc.execute_script import ExecuteScript, LuaPrinter
from dicomproxy.scripting.orthanc.http_filter import OrthancHttpFilter
from dicomproxy.scripting.orthanc.luajson import dump_json, parse_json, print_recursive
from dicomproxy.scripting.orthanc.pacs import Pacs, PacsError, orthanc_id
from dicomproxy.scripting.orthanc.toolbox import TOOLBOX_LUA, CallSystem, RemovedCallbacks
from dicomproxy.scripting.orthanc.upload_filter import UploadFilter

log = logging.getLogger("dicomproxy.orthanc")

__all__ = ["OrthancLayer", "install", "orthanc_id"]

# Lua side of the functions that take a body. Strings reach Python as UTF-8 text, so a byte
# string that is not UTF-8 (a DICOM file from RestApiGet('/instances/x/file')) is sent with its
# bytes mapped one to one onto U+0080..U+00FF and flagged; Python gets the exact bytes back.
# string.gsub with a table runs in C: ~ tens of MB/s.
# A library (compiled in an engine on the first call of one of its functions): the private
# exports (_Orthanc*) come as its argument, its functions go back in a table.
LUA_SHIM = r"""
local private = ...
local rest, http, parse, say = private._OrthancRestApi, private._OrthancHttp, private._OrthancParseJson,
  private._OrthancPrint
local type, tostring, select, concat = type, tostring, select, table.concat
local utf8len, gsub, char = utf8.len, string.gsub, string.char
local LATIN1 = nil  -- built on first binary body
local M = {}

local function body(b)
  if type(b) == "number" then b = tostring(b) end
  if type(b) ~= "string" or utf8len(b) then return b, false end
  if not LATIN1 then
    LATIN1 = {}
    for c = 128, 255 do LATIN1[char(c)] = utf8.char(c) end
  end
  return (gsub(b, "[\128-\255]", LATIN1)), true
end

function M.RestApiGet(uri, builtin, headers) return rest("GET", uri, nil, false, headers) end
function M.RestApiPost(uri, data, builtin, headers) local b, l = body(data) return rest("POST", uri, b, l, headers) end
function M.RestApiPut(uri, data, builtin, headers) local b, l = body(data) return rest("PUT", uri, b, l, headers) end
function M.RestApiDelete(uri, builtin, headers) return rest("DELETE", uri, nil, false, headers) end
function M.HttpGet(url, headers) return http("GET", url, nil, false, headers) end
function M.HttpPost(url, data, headers) local b, l = body(data) return http("POST", url, b, l, headers) end
function M.HttpPut(url, data, headers) local b, l = body(data) return http("PUT", url, b, l, headers) end
function M.HttpDelete(url, headers) return http("DELETE", url, nil, false, headers) end
-- Orthanc's print: one log line, arguments joined by ", " (C stdout would be block-buffered).
function M.print(...)
  local parts = {}
  for i = 1, select("#", ...) do
    local s = tostring((select(i, ...)))
    if not utf8len(s) then s = gsub(s, "[\128-\255]", "?") end
    parts[i] = s
  end
  say(concat(parts, ", "))
end

function M.ParseJson(s)
  if type(s) == "number" then s = tostring(s) end
  if type(s) ~= "string" or not utf8len(s) then return nil end
  return parse(s)
end

return M
"""
SHIM_FUNCTIONS = ("RestApiGet", "RestApiPost", "RestApiPut", "RestApiDelete", "HttpGet", "HttpPost", "HttpPut",
                  "HttpDelete", "print", "ParseJson")

REST_NAMES = {"GET": "RestApiGet", "POST": "RestApiPost", "PUT": "RestApiPut", "DELETE": "RestApiDelete"}
HTTP_NAMES = {"GET": "HttpGet", "POST": "HttpPost", "PUT": "HttpPut", "DELETE": "HttpDelete"}


def _check_uid_replacements(replace: dict[str, Any]) -> None:
    """A ``ModifyInstance`` replacement of a UI element must be a UID (PS3.5 9.1): refused before
    the PACS is asked, naming the tag and the value."""
    for key, value in replace.items():
        try:
            tag = datasets.parse_key(key)
        except datasets.TableError:
            continue  # a name the PACS may know and we do not: it answers for it
        if _dictionary_vr(tag) == "UI":
            try:
                datasets.check_uids(key, value)
            except datasets.TableError as e:
                raise LuaExportError(f"replacement {e}") from None


def _dictionary_vr(tag: Any) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _body(data: Any, latin1: Any) -> bytes | None:
    if data is None:
        return None
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("latin-1" if latin1 else "utf-8")
    raise TypeError(f"the body must be a string, got {type(data).__name__}")


_BAD = object()  # what _call_args returns for arguments Orthanc would refuse


def _call_args(name: str, target: Any, expects: str, data: Any, latin1: Any) -> Any:
    """The body of an ``Http*``/``RestApi*`` call, or ``_BAD`` after logging what Orthanc logs."""
    if not isinstance(target, str) or not target:
        log.error("Lua: Bad parameters to %s() (expects %s)", name, expects)
        return _BAD
    try:
        return _body(data, latin1)
    except TypeError as e:
        log.error("Lua: Bad parameters to %s(): %s", name, e)
        return _BAD


def _header_map(headers: Any, lower: bool) -> dict[str, str]:
    if not isinstance(headers, dict):
        return {}
    return {(str(k).lower() if lower else str(k)): str(v) for k, v in headers.items() if v is not None}


def _tag_value(value: Any) -> Any:
    """Replacement values as Orthanc's /modify wants them: numbers as their text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):  # {} from Lua, or a table with holes
        return [value[k] for k in sorted(value, key=str)]
    return [value]


# --------------------------------------------------------------------------- HttpGet & co
@dataclass
class HttpOptions:
    username: str | None = None
    password: str = ""
    timeout: float = 0.0  # seconds; 0: no limit of its own (the Lua call's budget still applies)


class LuaHttp:
    """Orthanc's generic HTTP client functions; credentials and timeout belong to one engine,
    as they belong to Orthanc's one Lua context (a transient engine starts with none).

    Any URL may be called, not only the PACS: requests go through the gateway's one upstream
    client, which keeps a bounded pool per origin with the same TLS verification and timeouts
    as the PACS's (``SetHttpTimeout`` adds an overall limit of its own). Redirects are followed.
    """

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._options: weakref.WeakKeyDictionary[LuaEngine, HttpOptions] = weakref.WeakKeyDictionary()
        self.client = client

    def options(self, engine: LuaEngine) -> HttpOptions:
        opts = self._options.get(engine)
        if opts is None:
            opts = self._options[engine] = HttpOptions()
        return opts

    def set_credentials(self, engine: LuaEngine, username: Any = None, password: Any = None) -> None:
        if not isinstance(username, str | int | float) or not isinstance(password, str | int | float):
            log.error("Lua: Bad parameters to SetHttpCredentials() (expects a username and a password)")
            return
        opts = self.options(engine)
        opts.username, opts.password = str(username), str(password)

    def set_timeout(self, engine: LuaEngine, seconds: Any = None) -> None:
        if isinstance(seconds, str):
            try:
                seconds = float(seconds)
            except ValueError:
                seconds = None
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            log.error("Lua: Bad parameters to SetHttpTimeout() (expects a number of seconds)")
            return
        self.options(engine).timeout = max(float(seconds), 0.0)

    async def request(
        self, engine: LuaEngine, method: Any, url: Any, data: Any = None, latin1: Any = False, headers: Any = None
    ) -> bytes | str | None:
        name = HTTP_NAMES.get(str(method), "Http")
        body = _call_args(name, url, "a URL", data, latin1)
        if body is _BAD:
            return None
        if not url.lower().startswith(("http://", "https://")):
            log.error("Lua: Error in %s() for URL %s: expects an absolute http:// or https:// URL", name, url)
            return None
        opts = self.options(engine)
        auth = httpx.BasicAuth(opts.username, opts.password) if opts.username is not None else None
        try:
            async with asyncio.timeout(opts.timeout or None):
                resp = await self.client.request(
                    str(method), url, content=body, headers=_header_map(headers, lower=False),
                    auth=auth or httpx.USE_CLIENT_DEFAULT, follow_redirects=True,
                )
            answer, status = resp.content, resp.status_code
        except TimeoutError:
            log.error("Lua: Error in %s() for URL %s: no answer within %g s (SetHttpTimeout)", name, url, opts.timeout)
            return None
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            log.error("Lua: Error in %s() for URL %s: %s", name, url, str(e) or type(e).__name__)
            return None
        if not 200 <= status < 300:
            log.error("Lua: Error in %s() for URL %s: HTTP %d", name, url, status)
            return None
        return "SUCCESS" if method == "DELETE" else answer



# --------------------------------------------------------------------------- Initialize / Finalize
class Lifecycle:
    """``Initialize()`` when main.lua loads (and after each hot reload), ``Finalize()`` on the
    engine being replaced, removed, or at shutdown. Errors are logged; the script stays loaded."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.live: LuaEngine | None = None

    async def _call(self, engine: LuaEngine, name: str) -> None:
        if not engine.defines(name):
            return
        try:
            await engine.call(name)
        except LuaError as e:
            log.error("%s failed: %s", name, e.traceback)

    async def loaded(self, engine: LuaEngine) -> None:
        previous, self.live = self.live, engine
        if previous is not None and previous is not engine:
            await self._call(previous, "Finalize")
        await self._call(engine, "Initialize")

    async def tick(self) -> None:
        """main.lua was deleted: its engine is gone without a reload, so say goodbye to it."""
        if self.live is not None and self.host.scripts.singleton is None:
            engine, self.live = self.live, None
            await self._call(engine, "Finalize")

    async def shutdown(self) -> None:
        engine, self.live = self.live, None
        if engine is not None and self.host.scripts.singleton is engine:
            await self._call(engine, "Finalize")


# --------------------------------------------------------------------------- the layer
class OrthancLayer:
    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.host = gateway.lua
        self.pacs = Pacs(gateway.upstream)
        self.http = LuaHttp(gateway.upstream.client)
        self.printer = LuaPrinter()
        self.lua_stored = LuaStored()
        self.pump = EventPump(self.host)
        self.deletions = Deletions(self.pacs, self.host, self.pump)
        self.lifecycle = Lifecycle(self.host)
        self.removed = RemovedCallbacks()
        # OsExecute's own function, with whatever limits the script host gave it
        self.call_system = CallSystem(
            self.pacs, self.host.scripts.exports["OsExecute"].func, self.settings.data_folder / "orthanc" / "tmp")
        self.dicom_forwarded = DicomForwarded(gateway.hooks.get(InstanceStored), self.host)
        cursor = CursorFile(self.settings.data_folder / "orthanc" / "changes.json", gateway.upstream.base)
        self.events = OrthancEvents(
            self.host,
            ChangeFeed(self.pacs, self.host, cursor, self._origin),
            JobWatcher(self.pacs, self.host),
            self.pump,
            poll_interval=self.settings.orthanc.poll_interval,
            heartbeat_period=self.settings.orthanc.heartbeat_period,
            on_tick=self._tick,
            on_stop=self._stopped,
        )

    async def _stopped(self) -> None:
        await self.lifecycle.shutdown()

    async def _tick(self) -> None:
        await self.lifecycle.tick()
        scripts = self.host.scripts
        self.removed.check(lambda name: name in scripts.transient_state.callbacks, str(scripts.transient_state.path))

    async def _loaded(self, engine: LuaEngine) -> None:
        self.removed.check(engine.defines, engine.script)
        await self.lifecycle.loaded(engine)

    # -- wiring ---------------------------------------------------------------------------
    def install(self) -> None:
        host = self.host
        host.add_export("_OrthancRestApi", self.rest_api, is_async=True)
        host.add_export("_OrthancHttp", self.http.request, is_async=True, pass_engine=True)
        host.add_export("_OrthancParseJson", parse_json)
        host.add_export("_OrthancPrint", self.printer, pass_engine=True)
        host.add_export("DumpJson", dump_json, pass_engine=True, raw=True)
        host.add_export("PrintRecursive", print_recursive, pass_engine=True, raw=True)
        host.add_export("SetHttpCredentials", self.http.set_credentials, pass_engine=True)
        host.add_export("SetHttpTimeout", self.http.set_timeout, pass_engine=True)
        host.add_export("GetOrthancConfiguration", self.get_configuration, is_async=True)
        host.add_export("SendToModality", self.send_to_modality, is_async=True)
        host.add_export("SendToPeer", self.send_to_peer, is_async=True)
        host.add_export("ModifyInstance", self.modify_instance, is_async=True)
        host.add_export("Delete", self.delete, is_async=True)
        host.add_export("ModifyResource", self.modify_instance, is_async=True)
        host.add_export("CallSystem", self.call_system, is_async=True)
        host.add_library("orthanc", LUA_SHIM, SHIM_FUNCTIONS)
        host.add_lua(TOOLBOX_LUA, "Orthanc toolbox")
        host.add_loaded_hook(self._loaded)
        self.dicom_forwarded.install()
        lua, orthanc = self.settings.lua, self.settings.orthanc
        upload_open = lua.fail_open or "ReceivedInstanceFilter" in lua.fail_open_hooks
        fail_open = self.settings.lua.fail_open or "IncomingHttpRequestFilter" in self.settings.lua.fail_open_hooks
        # One ASGI layer for both filters: the upload filter runs for POSTs, after IncomingHttpRequestFilter.
        self.gateway.add_middleware(lambda app: OrthancHttpFilter(
            app, host, self.deletions, fail_open=fail_open, uploads=UploadFilter(
                app, host, dicomweb_root=self.settings.upstream.dicomweb_root,
                limit=orthanc.filter_header_max_bytes, fail_open=upload_open)))
        if self.gateway.worker.owner:  # Server:Workers: one change feed, so OnStableStudy & co. fire once
            self.gateway.add_component(self.events)
        self.gateway.add_health("orthanc", self.events.health)
        if self.settings.orthanc.execute_lua_enabled:
            self.gateway.mount(EXECUTE_PATH, ExecuteScript(
                host, self.printer, allow_anonymous=self.settings.orthanc.execute_lua_anonymous))

    # -- RestApi* -------------------------------------------------------------------------
    async def rest_api(self, method: Any, uri: Any, data: Any = None, latin1: Any = False, headers: Any = None) -> Any:
        """``RestApiGet/Post/Put/Delete``: the answer body, ``true`` for a DELETE, ``nil`` on failure.
        ``builtin`` is accepted and ignored: the whole REST API of the PACS is reachable."""
        name = REST_NAMES.get(str(method), "RestApi")
        body = _call_args(name, uri, "a URI such as /instances", data, latin1)
        if body is _BAD:
            return None
        if method in ("POST", "PUT") and body is None:
            body = b""
        hdrs = _header_map(headers, lower=True)
        upload = method == "POST" and uri.split("?", 1)[0].rstrip("/") == "/instances"
        if upload:
            try:
                refused = await self._lua_upload_refused(body)
            except LuaExportError as e:
                log.error("Lua: Error in %s() for URI %s: %s", name, uri, e)
                return None
            if refused is not None:
                return json.dumps(refused, indent=2).encode()
        try:
            if method == "DELETE":
                await self.deletions.delete(uri, hdrs)
                return True
            answer = await self.pacs.request(method, uri, body, hdrs)
        except PacsError as e:
            log.error("Lua: Error in %s() for URI %s: %s", name, uri, e)
            return None
        if upload:
            self._note_upload(answer)
        return answer

    async def _lua_upload_refused(self, body: bytes | None) -> dict[str, Any] | None:
        """Orthanc filters what its Lua stores too (origin ``Lua``): Orthanc's FilteredOut answer
        when ``ReceivedInstanceFilter`` refuses ``body``, else None (also for a body that is not
        DICOM: the PACS answers that)."""
        if not body or not self.host.defines("ReceivedInstanceFilter"):
            return None
        try:
            header = upload_filter.parse_header(body, complete=True)
        except upload_filter.Refusal:
            return None
        assert header is not None  # complete=True: the whole file is there
        try:
            d = await self.host.dispatch("ReceivedInstanceFilter", header.table, {"RequestOrigin": "Lua"}, header.info)
        except LuaError as e:
            raise LuaExportError(f"ReceivedInstanceFilter failed: {e}") from None
        if any(not isinstance(r, bool) for r in d.results):
            raise LuaExportError("ReceivedInstanceFilter must return true or false")
        if all(d.results):
            return None
        log.info("ReceivedInstanceFilter refused an instance stored by a script (SOPInstanceUID %s)",
                 header.uids["SOPInstanceUID"])
        return upload_filter.filtered_out(header.uids)

    def _note_upload(self, answer: bytes) -> None:
        try:
            stored = json.loads(answer)
        except ValueError:
            return
        for item in stored if isinstance(stored, list) else [stored]:
            if isinstance(item, dict) and isinstance(item.get("ID"), str):
                self.lua_stored.add(item["ID"])

    # -- routing helpers ------------------------------------------------------------------
    async def _post_json(self, uri: str, payload: Any) -> bytes:
        try:
            return await self.pacs.request("POST", uri, json.dumps(payload).encode())
        except PacsError as e:
            raise LuaExportError(str(e)) from None

    async def send_to_modality(self, resource: Any = None, modality: Any = None, local_aet: Any = None,
                               timeout: Any = None) -> Any:
        """C-STORE by the PACS (``POST /modalities/{modality}/store``, synchronous); returns the id."""
        if resource is None:
            raise LuaExportError("Cannot send a nonexistent resource")
        if not isinstance(modality, str) or not modality:
            raise LuaExportError("expects a modality name declared in the PACS, e.g. SendToModality(id, 'sample')")
        payload: dict[str, Any] = {"Resources": [str(resource)], "Synchronous": True}
        if local_aet:
            payload["LocalAet"] = str(local_aet)
        if isinstance(timeout, int | float) and timeout > 0:
            payload["Timeout"] = int(timeout)
        await self._post_json(f"/modalities/{quote(modality, safe='')}/store", payload)
        return resource

    async def send_to_peer(self, resource: Any = None, peer: Any = None) -> Any:
        """``POST /peers/{peer}/store`` (synchronous); returns the id."""
        if resource is None:
            raise LuaExportError("Cannot send a nonexistent resource")
        if not isinstance(peer, str) or not peer:
            raise LuaExportError("expects a peer name declared in the PACS, e.g. SendToPeer(id, 'peer')")
        await self._post_json(f"/peers/{quote(peer, safe='')}/store", {"Resources": [str(resource)],
                                                                       "Synchronous": True})
        return resource

    async def modify_instance(self, resource: Any = None, replacements: Any = None, removals: Any = None,
                              remove_private: Any = None) -> str:
        """``POST /instances/{id}/modify`` then ``POST /instances``: the new instance's id."""
        if resource is None:
            raise LuaExportError("Cannot modify a nonexistent resource")
        payload: dict[str, Any] = {"Force": True}  # Orthanc's Lua modifications allow manual identifiers
        if isinstance(replacements, dict) and replacements:
            payload["Replace"] = {str(k): _tag_value(v) for k, v in replacements.items()}
            _check_uid_replacements(payload["Replace"])
        if removals:
            payload["Remove"] = [str(v) for v in _as_list(removals)]
        if remove_private:
            payload["RemovePrivateTags"] = True
        modified = await self._post_json(f"/instances/{resource}/modify", payload)
        if await self._lua_upload_refused(modified) is not None:
            raise LuaExportError(f"ReceivedInstanceFilter refused the modified instance of {resource}")
        try:
            stored = json.loads(await self.pacs.request("POST", "/instances", modified))
        except PacsError as e:
            raise LuaExportError(f"storing the modified instance: {e}") from None
        new_id = stored.get("ID") if isinstance(stored, dict) else None
        if not isinstance(new_id, str):
            raise LuaExportError(f"the PACS did not say where it stored the modified instance: {stored!r}")
        self.lua_stored.add(new_id, ModifiedFrom=str(resource))
        return new_id

    async def delete(self, resource: Any = None) -> None:
        """``DELETE /instances/{id}``; returns nil (Orthanc forbids chaining after a Delete)."""
        if resource is None:
            raise LuaExportError("Cannot delete a nonexistent resource")
        try:
            await self.deletions.delete(f"/instances/{resource}")
        except PacsError as e:
            raise LuaExportError(str(e)) from None
        return None

    # -- GetOrthancConfiguration ----------------------------------------------------------
    async def get_configuration(self) -> dict[str, Any]:
        """The PACS's configuration as far as its REST API shows it, plus the gateway's."""

        async def fetch(uri: str) -> Any:
            try:
                return await self.pacs.get(uri)
            except PacsError as e:
                log.warning("GetOrthancConfiguration: %s", e)
                return None

        system, modalities, peers = await asyncio.gather(
            fetch("/system"), fetch("/modalities?expand"), fetch("/peers?expand")
        )
        config: dict[str, Any] = {}
        if isinstance(system, dict):
            for key in ("Name", "DicomAet", "DicomPort", "HttpPort"):
                if key in system:
                    config[key] = system[key]
        config["DicomModalities"] = modalities if isinstance(modalities, dict) else {}
        config["OrthancPeers"] = peers if isinstance(peers, dict) else {}
        config["LuaHeartBeatPeriod"] = self.settings.orthanc.heartbeat_period
        config["LuaScripts"] = [str(p) for p in self.settings.orthanc.lua_scripts]
        config["AuthenticationEnabled"] = self.settings.authentication.enabled
        config["RegisteredUsers"] = dict(self.settings.tree.get("Authentication:Users", {}))  # passwords masked
        config["DicomProxy"] = self.settings.tree.as_dict()
        return config

    # -- OnStoredInstance origin ----------------------------------------------------------
    def _origin(self, rid: str, tags: dict[str, Any], metadata: dict[str, Any]) -> Any:
        """``(metadata, origin)`` for OnStoredInstance, or None when the DICOM side fires it."""
        mine = self.lua_stored.pop(rid)
        if mine is not None:
            return {**metadata, **mine}, {"RequestOrigin": "Lua"}
        if self.dicom_forwarded.skips(metadata):
            return None  # forwarded by our DICOM side: OnStoredInstance comes from its hook, with the modality's origin
        return metadata, origin_from_metadata(metadata)


def install(gateway: Host) -> None:
    """Add the Orthanc functions to every engine and the Orthanc callbacks to the gateway."""
    OrthancLayer(gateway).install()
