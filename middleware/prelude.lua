-- Runs first in every Lua runtime. Installs the time budget, the await bridge and safe
-- wrappers, then hides itself: scripts only see the wrapped globals.
--
-- Why wrappers: the time budget is enforced by a count hook that raises BUDGET. A script's own
-- pcall/xpcall/coroutine.resume would catch it and loop forever, so those are wrapped to
-- re-raise BUDGET. Hooks are per coroutine in Lua 5.4, so every coroutine gets one.
local py_now, hook_count = ...

local sethook = debug.sethook
local co_create, co_resume, co_yield, co_status = coroutine.create, coroutine.resume, coroutine.yield,
    coroutine.status
local raw_pcall, raw_xpcall, raw_error, raw_setmetatable = pcall, xpcall, error, setmetatable
local getmetatable, tostring, type, select = getmetatable, tostring, type, select
local pack, unpack = table.pack, table.unpack
local traceback = debug.traceback
local next, pairs = next, pairs

local deadline = math.huge
local BUDGET = raw_setmetatable({}, { __tostring = function() return "script ran past its time budget (Lua:TimeoutMs)" end })
local TOKEN = {}

local function hook()
  if py_now() > deadline then raw_error(BUDGET, 0) end
end

local function rethrow(ok, ...)
  if not ok and (...) == BUDGET then raw_error(BUDGET, 0) end
  return ok, ...
end

pcall = function(f, ...) return rethrow(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...)
  return rethrow(raw_xpcall(f, function(e)
    if e == BUDGET then return e end
    return handler(e)
  end, ...))
end

local function new_coroutine(f)
  local co = co_create(f)
  sethook(co, hook, "", hook_count)
  return co
end

-- A script's own coroutine that awaits I/O: pass the await token up to the driver and hand the
-- answer back down, so HttpGet & co work inside user coroutines too (as OpenResty does).
local function forward(co, res)
  while res[1] and co_status(co) == "suspended" and getmetatable(res[2]) == TOKEN do
    res = pack(co_resume(co, co_yield(res[2])))
  end
  if not res[1] and res[2] == BUDGET then raw_error(BUDGET, 0) end
  return unpack(res, 1, res.n)
end

coroutine.create = new_coroutine
coroutine.resume = function(co, ...) return forward(co, pack(co_resume(co, ...))) end
coroutine.wrap = function(f)
  local co = new_coroutine(f)
  return function(...)
    local res = pack(coroutine.resume(co, ...))
    if not res[1] then raw_error(res[2], 0) end
    return unpack(res, 2, res.n)
  end
end

local function on_error(e)
  if e == BUDGET then return BUDGET end
  if type(e) ~= "string" then e = tostring(e) end
  return traceback(e, 2)
end

local threads, next_id = {}, 0
local api = {}

local function finish(id, co, res)
  if not res[1] then
    threads[id] = nil
    if res[2] == BUDGET then return "budget" end
    return "error", tostring(res[2])
  end
  if co_status(co) == "suspended" then
    if getmetatable(res[2]) == TOKEN then
      threads[id] = co
      return "await", res[2].id, id
    end
    threads[id] = nil
    return "error", "coroutine.yield called outside a coroutine the script created"
  end
  threads[id] = nil
  if res[2] then return "done", true, unpack(res, 3, res.n) end
  if res[3] == BUDGET then return "budget" end
  return "done", false, tostring(res[3])
end

-- Run `f(...)` as a budgeted coroutine until it yields or ends (Lua threads never cross into
-- Python: a suspended one is kept here under an id).
-- Returns: "await", token, thread_id | "done", ok, values... | "budget" | "error", message
function api.call(f, until_, ...)
  local args = pack(...)
  local co = new_coroutine(function() return raw_xpcall(f, on_error, unpack(args, 1, args.n)) end)
  next_id = next_id + 1
  deadline = until_
  local res = pack(co_resume(co))
  deadline = math.huge
  return finish(next_id, co, res)
end

-- Resume suspended thread `id` with the answer to its await.
function api.resume(id, until_, ...)
  local co = threads[id]
  deadline = until_
  local res = pack(co_resume(co, ...))
  deadline = math.huge
  return finish(id, co, res)
end

function api.drop(id) threads[id] = nil end

-- Bind exports in Lua, around one Python dispatcher per kind (binding each Python function
-- separately costs ~8 us per export per runtime; this costs one closure each).
-- py_call(name, ...) returns (ok, values...): a failure is a Lua error at the caller's line.
-- py_start(name, ...) starts an awaitable and returns its token: the coroutine yields to the
-- driver, which awaits it and resumes us with (ok, values...).
function api.bind(sync_names, async_names, py_call, py_start)
  for name in sync_names:gmatch("[^,]+") do
    _G[name] = function(...)
      local r = pack(py_call(name, ...))
      if not r[1] then raw_error(r[2], 2) end
      return unpack(r, 2, r.n)
    end
  end
  for name in async_names:gmatch("[^,]+") do
    _G[name] = function(...)
      local token = py_start(name, ...)
      local r = pack(co_yield(raw_setmetatable({ id = token }, TOKEN)))
      if not r[1] then raw_error(r[2], 2) end
      return unpack(r, 2, r.n)
    end
  end
end

-- Case-insensitive read-only table over `t` (keys stored lower-case).
function api.ci_table(t)
  return raw_setmetatable({}, {
    __index = function(_, k) if type(k) == "string" then return t[k:lower()] end end,
    __pairs = function() return next, t, nil end,
    __newindex = function() raw_error("this table is read-only", 2) end,
  })
end

-- HTTP objects for onHttpRequest / onHttpResponse, built as plain Lua tables: reading fields
-- and calling methods costs no Python round trip (through lupa each costs ~2-3 us). Edits are
-- recorded here and read back once by api.http_result. Methods work with ':' and '.'.
local TOKEN_CHARS = "^[%w!#$%%&'*+%-.^_`|~]+$"
local HOP = { connection = true, ["keep-alive"] = true, ["proxy-authenticate"] = true,
  ["proxy-authorization"] = true, te = true, trailer = true, ["transfer-encoding"] = true, upgrade = true }
local lower, tconcat, tointeger, tonumber = string.lower, table.concat, math.tointeger, tonumber
local utf8len, gsub, format, char = utf8.len, string.gsub, string.format, string.char
local HEX = nil

-- Python decodes Lua strings as UTF-8: a binary body crosses hex-encoded ("x" marker).
local function body_out(b)
  if b == nil or utf8len(b) then return b, "s" end
  if not HEX then
    HEX = {}
    for i = 0, 255 do HEX[char(i)] = format("%02x", i) end
  end
  return (gsub(b, ".", HEX)), "x"
end

local function check_name(k, level)
  if type(k) ~= "string" or not k:match(TOKEN_CHARS) then
    raw_error("invalid header name " .. tostring(k) .. ": use letters, digits and -", level + 1)
  end
end

local function check_value(k, v, level)
  if type(v) == "number" then v = tostring(v) end
  if type(v) ~= "string" then raw_error("header " .. k .. ": value must be a string, got " .. type(v), level + 1) end
  if v:find("[\r\n%z]") then raw_error("header " .. k .. ": value contains CR, LF or NUL; refused", level + 1) end
  return v
end

local function header_table(...)
  local t = {}
  for i = 1, select("#", ...), 2 do
    local k, v = lower((select(i, ...))), (select(i + 1, ...))
    if t[k] then t[k] = t[k] .. ", " .. v else t[k] = v end
  end
  return api.ci_table(t)
end

function api.http_object(kind, scheme, method, path, query, ip, user, status, ...)
  local obj = { Scheme = scheme, Method = method, Path = path, QueryString = query, RemoteIp = ip,
    User = user, StatusCode = status }
  local ops, n, body = {}, 0, nil
  local headers = nil
  local packed = pack(...)
  local function args(a, b, c) if a == obj then return b, c end return a, b end
  local function add(kind_, a, b, c)
    local k, v = args(a, b, c)
    check_name(k, 3)
    v = check_value(k, v, 3)
    if kind_ == "r" and HOP[lower(k)] then raw_error(k .. " is a hop-by-hop header; the server manages it", 3) end
    ops[n + 1], ops[n + 2], ops[n + 3] = kind_ .. "+", k, v
    n = n + 3
    headers = nil
  end
  local function remove(kind_, a, b)
    local k = args(a, b)
    check_name(k, 3)
    ops[n + 1], ops[n + 2], ops[n + 3] = kind_ .. "-", k, ""
    n = n + 3
    headers = nil
  end
  local primary = kind == "request" and "q" or "r"
  obj.AddHeader = function(a, b, c) add(primary, a, b, c) end
  obj.RemoveHeader = function(a, b) remove(primary, a, b) end
  obj.AddResponseHeader = function(a, b, c) add("r", a, b, c) end
  obj.RemoveResponseHeader = function(a, b) remove("r", a, b) end
  obj.ResponseWrite = function(a, b)
    local data = a
    if a == obj then data = b end
    if type(data) == "number" then data = tostring(data) end
    if type(data) ~= "string" then raw_error("ResponseWrite expects a string, got " .. type(data), 2) end
    body = body or {}
    body[#body + 1] = data
  end
  obj.SetStatusCode = function(a, b)
    local code = a
    if a == obj then code = b end
    obj.StatusCode = code
  end
  local function result()
    local code = tointeger(tonumber(obj.StatusCode))
    if not code or code < 100 or code > 599 then
      raw_error("StatusCode must be a number from 100 to 599, got " .. tostring(obj.StatusCode), 0)
    end
    local data, kind_ = body_out(body and tconcat(body) or nil)
    return code, data, kind_, unpack(ops, 1, n)
  end
  -- Headers is built on first read, and again after an edit, so it always shows the edits.
  local current = {}
  for i = 1, packed.n do current[i] = packed[i] end
  raw_setmetatable(obj, { __index = function(_, key)
    if key == "Headers" then
      if not headers then
        local flat, m = {}, 0
        local removed = {}
        for i = 1, n, 3 do
          if ops[i]:sub(1, 1) == primary then
            local lk = lower(ops[i + 1])
            removed[lk] = true
          end
        end
        for i = 1, #current, 2 do
          if not removed[lower(current[i])] then flat[m + 1], flat[m + 2] = current[i], current[i + 1]; m = m + 2 end
        end
        for i = 1, n, 3 do
          if ops[i] == primary .. "+" then flat[m + 1], flat[m + 2] = ops[i + 1], ops[i + 2]; m = m + 2 end
        end
        headers = header_table(unpack(flat, 1, m))
      end
      return headers
    end
  end })
  return obj, result
end

function api.defines(name) return type(_G[name]) == "function" end

function api.is_sequence(t)
  local n = #t
  if n == 0 then return false end
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  return count == n
end

-- Everything an engine needs, in one call from Python (each Lua/Python crossing costs ~1-2 us
-- and a transient engine is made per request): exports, setup chunks, search paths, globals.
-- Arguments: sync_names, async_names, py_call, py_start, cpath_prefix, path_prefix,
-- n_setup, setup chunks..., then name, value pairs of globals.
function api.init(sync_names, async_names, py_call, py_start, cpath_prefix, path_prefix, n_setup, ...)
  api.bind(sync_names, async_names, py_call, py_start)
  if cpath_prefix ~= "" then package.cpath = cpath_prefix .. ";" .. package.cpath end
  if path_prefix ~= "" then package.path = path_prefix .. ";" .. package.path end
  for i = 1, n_setup do
    local chunk = select(i, ...)
    local fn, err = load(chunk, "=setup", "b")
    if not fn then raw_error(err, 0) end
    fn()
  end
  for i = n_setup + 1, select("#", ...), 2 do
    local name, value = select(i, ...)
    _G[name] = value
  end
end

return api.call, api.resume, api.drop, api.defines, api.ci_table, api.http_object, api.init
