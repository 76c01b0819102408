-- The coroutine library as scripts see it (loaded on first use). Every coroutine a script makes
-- gets the count hook (new_coroutine, prelude.lua) and is reported to the watchdog when it is
-- resumed (track, held to the end of the call); resume,
-- wrap and close raise the budget error again once it has been raised (they would return it
-- as a value); the worker a call runs on is the script's "main" coroutine: running() returns
-- the main thread for it, and it cannot be resumed, closed or yielded from.
local K = ...
local B = K.group("base")
local type, pack, unpack, raw_error = K.type, K.table.pack, K.table.unpack, K.error
local co = K.coroutine
local co_resume, co_status, co_close, co_running, co_isyieldable = co.resume, co.status, co.close, co.running,
  co.isyieldable
local new_coroutine, forward, rethrow, track, workers, MAIN = K.new_coroutine, K.forward, K.rethrow, K.track,
  K.workers, K.MAIN
local check_function, argerror, typename = B.check_function, B.argerror, B.typename

local function check_co(c, fname)
  if type(c) ~= "thread" then argerror(4, 1, fname, "coroutine expected, got " .. typename(c)) end
  if workers[c] then raw_error("cannot " .. fname .. " the coroutine a call runs on", 3) end
  return c
end

local function resume(c, ...)
  track(c)  -- (the watchdog can reach it from now to the end of the call)
  return forward(c, pack(co_resume(c, ...)))
end

local M = {}

function M.create(f) return new_coroutine(check_function(f, 1, "create")) end

function M.resume(c, ...) return resume(check_co(c, "resume"), ...) end

function M.wrap(f)
  local c = new_coroutine(check_function(f, 1, "wrap"))
  return function(...)
    local res = pack(resume(c, ...))
    if not res[1] then raw_error(res[2], 0) end
    return unpack(res, 2, res.n)
  end
end

function M.close(c)
  track(check_co(c, "close"))  -- (its __close handlers run on it)
  return rethrow(co_close(c))
end

function M.status(c) return co_status(check_co(c, "status")) end

function M.running()
  local c, main = co_running()
  if workers[c] then return MAIN, true end
  return c, main
end

function M.isyieldable(c)
  if c == nil then c = co_running() end
  if workers[c] then return false end
  return co_isyieldable(c)
end

return M
