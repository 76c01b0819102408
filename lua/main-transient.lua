-- main-transient.lua: the TRANSIENT engine. A fresh Lua state for each HTTP request, DICOM
-- association or TUS upload: nothing set here survives into the next one, and engines run in
-- parallel. Use it for per-request logic that must not share state.
--
-- Events reach the singleton (main.lua) first, then this engine, each only if defined.
-- As shipped it defines no callback.

-- function onHttpRequest(request)
--   if request.Headers["x-debug"] then LogInfo("debug request {0} {1}", request.Method, request.Path) end
-- end
