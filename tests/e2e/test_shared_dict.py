"""SharedDict through a real gateway: data passed between Lua instances of every engine type
(the seed's "Data can be passed between Lua instances"). The README's example: the transient
engine of each DICOM association counts stores per modality, the singleton reports the counts
over HTTP, a background task reads and writes the same store; and a full store answers
``no memory`` to ``add``/``incr`` and evicts for ``set``. Units: tests/scripting/test_shared.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom

from tests import dicom_samples
from tests.e2e.test_dicom_gateway import storescu
from tests.peers import GatewayProcess, OrthancServer, wait_until

TRANSIENT = """
function onCStore(dataset, assoc)
  SharedDict:incr("stores:" .. (dataset.Modality or "?"), 1, 0)
  SharedDict:set("last:" .. assoc.CallingAE, dataset.SOPInstanceUID, 3600)
end
"""

MAIN = """
function onHttpRequest(r)
  if r.Path == "/counts" then
    local out = {}
    for _, key in ipairs(SharedDict:keys(0)) do
      local modality = key:match("^stores:(.+)$")
      if modality then out[modality] = SharedDict:get(key) end
    end
    r:ResponseWrite(DumpJson(out)) return true
  end
  if r.Path == "/last" then r:ResponseWrite(SharedDict:get("last:" .. r.Headers["X-Aet"]) or "") return true end
  if r.Path == "/task" then r:ResponseWrite(LuaBackgroundWorker("main-task.lua", "summary", "")) return true end
  if r.Path == "/summary" then r:ResponseWrite(DumpJson(SharedDict:get("summary") or {})) return true end
  if r.Path == "/fill" then
    local results = {}
    for i = 1, 5 do
      local ok, err = SharedDict:add("lock:" .. i, "held")
      results[#results + 1] = ok and "ok" or err
    end
    local v, err = SharedDict:incr("new-counter", 1, 0)
    results[#results + 1] = v and "counted" or err
    local ok, err, forcible = SharedDict:set("cache", "x")
    results[#results + 1] = (ok and "set" or err) .. (forcible and " forcible" or "")
    r:ResponseWrite(DumpJson(results)) return true
  end
end
"""

TASK = """
function summary(args)
  local total = 0
  for _, key in ipairs(SharedDict:keys(0)) do
    if key:find("^stores:") then total = total + SharedDict:get(key) end
  end
  SharedDict:set("summary", { total = total, by = "task" })
  return total
end
"""


def send(gateway: GatewayProcess, folder: Path, calling: str, modalities: list[str]) -> list[str]:
    study = pydicom.uid.generate_uid()
    paths, uids = [], []
    for i, modality in enumerate(modalities):
        path, uid = dicom_samples.make_instance(folder / f"IM{i}.dcm", patient_id="PSHARED", patient_name="Shared^Dict",
                                                study_uid=study, modality=modality)
        paths.append(Path(path))
        uids.append(uid)
    storescu(gateway, *paths, calling=calling)  # one association: one transient engine for these
    return uids


def test_transient_engines_count_what_the_singleton_and_a_task_read(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory(scripts={"main.lua": MAIN, "main-transient.lua": TRANSIENT, "main-task.lua": TASK})
    send(gateway, tmp_path / "a", "CT01", ["CT", "CT", "MR"])
    last = send(gateway, tmp_path / "b", "US01", ["US", "CT"])[-1]
    fresh_orthanc.wait_for_instances(5)
    assert gateway.get("/counts").json() == {"CT": 3, "MR": 1, "US": 1}
    assert gateway.get("/last", headers={"X-Aet": "US01"}).text == last
    task_id = gateway.get("/task").text
    task = wait_until(lambda: (t := gateway.get(f"/dicomproxy/tasks/{task_id}").json())["state"] in ("done", "failed")
                      and t, timeout=15, what="the summary task")
    assert task["state"] == "done" and task["result"] == 5, task
    assert gateway.get("/summary").json() == {"total": 5, "by": "task"}


def test_a_full_store(gateway_factory: Any) -> None:
    gateway = gateway_factory({"Dicom": {"Port": 0}, "Lua": {"SharedDictMaxKeys": 3}}, {"main.lua": MAIN})
    """Three keys at most: two of five add()s and the incr() are refused (nothing evicted for
    them), then set() makes room by evicting the least recently used lock."""
    results = gateway.get("/fill").json()
    assert len(results) == 7 and results[:3] == ["ok", "ok", "ok"], results
    assert all(r.startswith("no memory") and "Lua:SharedDictMaxKeys" in r for r in results[3:6]), results
    assert results[6] == "set forcible", results
