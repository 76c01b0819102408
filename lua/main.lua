-- main.lua: the SINGLETON engine. Loaded once, shared by the HTTP, TUS and DICOM sides for the
-- life of the process (editing this file reloads it within ~1 s; a broken edit keeps the old one).
--
-- As shipped it defines no callback, so it costs nothing: a callback that is not defined is never
-- called. Uncomment what you need. Full reference: README.md, "Lua API".
--
-- Globals available here (and in every engine):
--   Config["Section:Key"]             the configuration (appsettings.json + DICOMPROXY__ env vars)
--   LogDebug/LogInfo/LogError(msg, ...)  "{0}" or "{Name}" placeholders are filled from the extra args
--   OsExecute(cmd, args)              -> exitCode, stdout, stderr (no shell; waits without blocking)
--   requireNative("socket.core")      native Lua modules from Lua:NativePath
--   LuaBackgroundWorker(script, entryFunc, args)  queue a background task (see main-task.lua)
--   InternalCmdRun(command, args)     gateway commands: "help", "send", "echo"

-- Keep a counter across requests (singleton state lives as long as the process):
-- requests = 0

-- Called first for every HTTP request. Return true to answer it yourself.
-- function onHttpRequest(request)
--   requests = requests + 1
--   if request.Path == "/blocked" then
--     request:SetStatusCode(403)
--     request:ResponseWrite("blocked by policy")
--     return true
--   end
--   request:AddHeader("X-Gateway", "DicomProxy")          -- goes to the PACS
--   request:AddResponseHeader("X-Request-Count", tostring(requests))
-- end

-- Called when the response starts, before any body byte is sent.
-- function onHttpResponse(response)
--   response:AddHeader("X-Served-By", "DicomProxy")
--   if response.StatusCode == 404 then response:ResponseWrite('{"error":"not found"}') end
-- end

-- A TUS upload finished. Return true if you handled the file (no default import).
-- function onTusFileComplete(metadata)
--   LogInfo("upload {0} finished: {1} ({2} bytes)", metadata["fileId"], metadata["filename"], metadata["size"])
-- end

-- DICOM: reject a calling AE, edit or reject stored instances.
-- function onDicomAssociation(assoc) return assoc.CallingAE ~= "UNWANTED" end
-- function onCStore(dataset, assoc)
--   dataset.InstitutionName = "Routed by DicomProxy"
-- end
