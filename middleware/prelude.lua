-- Runs first in every Lua runtime. Installs the time budget, the await bridge and the standard
-- library as scripts may use it (sandbox.lua, inserted below), binds the exports, then hides
-- itself: scripts only see the wrapped globals. What scripts can and cannot do is the README's
-- "Lua trust model"; the reasons for each choice are next to the code that makes it.
--
-- The budget: a count hook (every hook_count VM instructions) raises BUDGET once the deadline
-- has passed; the watchdog (watchdog.py) makes the hook fire at once when an instruction is slow.
-- Once raised, BUDGET is sticky: `expired` stays set until the next call starts, and everything
-- that can catch an error (pcall, xpcall, coroutine.resume/wrap/close, load) raises BUDGET again
-- when it is set, so no script can swallow it, not even by replacing the error in a __close
-- handler or by failing inside an xpcall message handler. Hooks are per Lua thread: every thread
-- a script runs on gets one (the workers below, and coroutines the script creates).
--
-- A transient engine runs this once per request, so it is written to be cheap: Python loads it
-- as bytecode with everything the engine needs in one call (each Lua/Python crossing costs
-- ~1-3 us) and gets back a single entry function; the HTTP objects create their methods lazily.
--
-- Arguments: py_now, hook_count, py_call, py_start, py_thread, full, mem_cap, script_root,
-- path_prefix, native_path, hidden_env, then name, value pairs of globals. The exports and the
-- setup Lua are not arguments: build_prelude (runtime.py) writes them into this source at the
-- markers below and compiles the whole once, so an engine gets them as bytecode constants (each
-- string or object made per engine costs ~1 us).
local py_now, hook_count, py_call, py_start, py_thread, full, mem_cap, script_root, path_prefix, native_path,
  hidden_env = ...

local G = _G
local sethook, raw_getinfo, raw_getmetatable = debug.sethook, debug.getinfo, debug.getmetatable
local co_create, co_resume, co_yield, co_status, co_close, co_running = coroutine.create, coroutine.resume,
  coroutine.yield, coroutine.status, coroutine.close, coroutine.running
local raw_pcall, raw_xpcall, raw_error, raw_setmetatable = pcall, xpcall, error, setmetatable
local getmetatable, tostring, type, select, rawget, rawset = getmetatable, tostring, type, select, rawget, rawset
local pack, unpack = table.pack, table.unpack
local traceback = debug.traceback
local next, load, raw_collectgarbage, raw_print = next, load, collectgarbage, print

local deadline, expired = math.huge, false
local BUDGET = raw_setmetatable({}, { __tostring = function() return "script ran past its time budget" end })
local TOKEN = {}

local function hook()
  if py_now() > deadline then
    expired = true
    raw_error(BUDGET, 0)
  end
end

local function budget_error() expired = true raw_error(BUDGET, 0) end

local function rethrow(ok, ...)
  if expired or (not ok and (...) == BUDGET) then budget_error() end
  return ok, ...
end

pcall = function(f, ...) return rethrow(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...)
  return rethrow(raw_xpcall(f, function(e)
    if e == BUDGET or expired then return BUDGET end
    return handler(e)
  end, ...))
end

local function new_coroutine(f)
  local co = co_create(f)
  sethook(co, hook, "", hook_count)
  return co
end

-- The threads a script runs on are reported to Python (py_thread) so that the watchdog can reach
-- them, and forgotten while Lua still holds them: a worker until it is retired, a coroutine of
-- the script from its first resume in a call to the end of that call (owned[worker] keeps it
-- alive meanwhile). Never from a finalizer: one that calls into Python while Python's collector
-- tears the runtime down reaches a freed object (measured: a segfault).
local current  -- the worker running the call in progress (set by start and RESUME)
local owned = {}  -- worker -> { [coroutine] = its name as reported }

local function track(co)
  local t = owned[current]
  if not t then
    t = {}
    owned[current] = t
  end
  if not t[co] then
    local name = tostring(co)
    py_thread(name, true)
    t[co] = name
  end
end

local function release_owned(w)
  local t = owned[w]
  if t then
    owned[w] = nil
    for _, name in next, t do py_thread(name, false) end
  end
end

-- A script's own coroutine that awaits I/O: pass the await token up to the driver and hand the
-- answer back down, so HttpGet & co work inside user coroutines too (as OpenResty does).
local function forward(co, res)
  while res[1] and co_status(co) == "suspended" and getmetatable(res[2]) == TOKEN do
    res = pack(co_resume(co, co_yield(res[2])))
  end
  if expired or (not res[1] and res[2] == BUDGET) then budget_error() end
  return unpack(res, 1, res.n)
end

-- ------------------------------------------------------------------ the driver
-- Calls run on worker threads (coroutines that loop: run a job, yield JOB_END with its results,
-- wait for the next), reused from call to call: no thread to make or to report per call. A
-- worker waiting on I/O is kept under an id (Lua threads never cross into Python). Each call
-- returns "await", token, thread_id | "done", ok, values... | "budget" | "error", message
local function on_error(e)
  if e == BUDGET or expired then return BUDGET end
  if type(e) ~= "string" then
    local ok, text = raw_pcall(tostring, e)  -- may run a __tostring: here, under the hook
    e = ok and type(text) == "string" and text or "(error object is a " .. type(e) .. " value)"
  end
  return traceback(e, 2)
end

local JOB_END = {}
local workers = {}  -- the worker threads (hidden from scripts), until retired
local idle, nidle = {}, 0
local threads, next_id = {}, 0

local function worker_loop(f, ...)
  return worker_loop(co_yield(JOB_END, raw_xpcall(f, on_error, ...)))
end

local function new_worker()
  local w = co_create(worker_loop)
  sethook(w, hook, "", hook_count)
  workers[w] = true
  return w
end

local function get_worker()
  if nidle == 0 then
    local w = new_worker()
    py_thread(tostring(w), true)
    return w
  end
  local w = idle[nidle]
  idle[nidle], nidle = nil, nidle - 1
  return w
end

local function retire(w)
  release_owned(w)
  py_thread(tostring(w), false)
  workers[w] = nil
end

local function job_end(w, fine, ...)
  if owned[w] then release_owned(w) end
  if nidle < 4 then nidle = nidle + 1 idle[nidle] = w else retire(w) end
  if expired or (not fine and (...) == BUDGET) then return "budget" end
  return "done", fine, ...
end

-- Runs on the main thread (no hook): only the prelude's own code, never a script's metamethod.
local function finish(id, w, ok, what, ...)
  threads[id] = nil
  if not ok then  -- the worker itself failed (an error outside the job's xpcall)
    retire(w)
    if expired or what == BUDGET then return "budget" end
    return "error", type(what) == "string" and what or "(error object is a " .. type(what) .. " value)"
  end
  if what == JOB_END then return job_end(w, ...) end
  if getmetatable(what) == TOKEN and co_status(w) == "suspended" then
    threads[id] = w
    return "await", what.id, id
  end
  retire(w)  -- left suspended in the middle of a job: never reused
  return "error", "coroutine.yield called outside a coroutine the script created"
end

local function unbudgeted(...) deadline = math.huge return ... end

local function start(until_, f, ...)
  local w = get_worker()
  next_id = next_id + 1
  deadline, expired, current = until_, false, w
  return finish(next_id, w, unbudgeted(co_resume(w, f, ...)))
end

-- ------------------------------------------------------------------ exports
-- Bound in Lua around one Python dispatcher per kind (binding each Python function separately
-- costs ~8 us per export per runtime; this costs one closure each, with the name a constant).
-- py_call(name, ...) returns (ok, values...): a failure is a Lua error at the caller's line.
-- py_start(name, ...) starts an awaitable and returns its token: the coroutine yields to the
-- driver, which awaits it and resumes us with (ok, values...).
local function sync_export(name)
  return function(...)
    local r = pack(py_call(name, ...))
    if not r[1] then raw_error(r[2], 2) end
    return unpack(r, 2, r.n)
  end
end
local function async_export(name)
  return function(...)
    local token = py_start(name, ...)
    local r = pack(co_yield(raw_setmetatable({ id = token }, TOKEN)))
    if not r[1] then raw_error(r[2], 2) end
    return unpack(r, 2, r.n)
  end
end
-- Exports named _... are for the libraries only: they are not globals.
local PRIVATE = {}

-- A library (LuaLibrary in runtime.py) is loaded on the first call of one of its functions.
local function library(code, chunkname)
  local fns
  return function(name)
    if not fns then
      local fn, err = load(code, chunkname, "b")
      if not fn then raw_error(err, 0) end
      fns = fn(PRIVATE)
    end
    return fns[name]
  end
end
local function lazy(lib, name)
  return function(...) return lib(name)(...) end
end
--@EXPORTS

-- ------------------------------------------------------------------ HTTP objects
-- onHttpRequest / onHttpResponse get plain Lua tables: reading fields and calling methods costs
-- no Python round trip. Edits are recorded as flat (op, name, value) triples and handed back
-- with the hook's result. Methods work with ':' and '.': each is bound to its object on first
-- access (a script uses two or three of them, so most are never made).
local TOKEN_CHARS = "^[%w!#$%%&'*+%-.^_`|~]+$"
local HOP = { connection = true, ["keep-alive"] = true, ["proxy-authenticate"] = true,
  ["proxy-authorization"] = true, te = true, trailer = true, ["transfer-encoding"] = true, upgrade = true }
local lower, tconcat, tointeger, tonumber = string.lower, table.concat, math.tointeger, tonumber
local utf8len, gsub, format, char, match, find = utf8.len, string.gsub, string.format, string.char, string.match,
  string.find
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

-- Error levels name the script's line: check_* (1) < add/remove (2) < METHODS entry (3) <
-- bound method (4) < script (5). None of these calls is a tail call, which would drop a level.
local function check_name(k)
  if type(k) ~= "string" or not match(k, TOKEN_CHARS) then
    raw_error("invalid header name " .. tostring(k) .. ": use letters, digits and -", 5)
  end
end

local function check_value(k, v)
  if type(v) == "number" then v = tostring(v) end
  if type(v) ~= "string" then raw_error("header " .. k .. ": value must be a string, got " .. type(v), 5) end
  if find(v, "[\r\n%z]") then raw_error("header " .. k .. ": value contains CR, LF or NUL; refused", 5) end
  return v
end

-- Headers: a read-only table of lower-cased names; any spelling of a name finds it.
local function read_only() raw_error("this table is read-only", 2) end
local LOWER = { __index = function(t, k)
  if type(k) == "string" then
    local lk = lower(k)
    if lk ~= k then return rawget(t, lk) end
  end
end }
local function headers_pairs(proxy) return next, getmetatable(proxy).__index, nil end

local function header_table(flat, m)
  local t = raw_setmetatable({}, LOWER)
  for i = 1, m, 2 do
    local k, v = lower(flat[i]), flat[i + 1]
    local prev = rawget(t, k)
    if prev then rawset(t, k, prev .. ", " .. v) else rawset(t, k, v) end
  end
  return raw_setmetatable({}, { __index = t, __newindex = read_only, __pairs = headers_pairs })
end

local function record(st, op, k, v)
  local ops, n = st.ops, st.n
  ops[n + 1], ops[n + 2], ops[n + 3] = op, k, v
  st.n = n + 3
  st.headers = nil
end

local function add(st, kind, k, v)
  check_name(k)
  v = check_value(k, v)
  if kind == "r" and HOP[lower(k)] then raw_error(k .. " is a hop-by-hop header; the server manages it", 4) end
  record(st, kind .. "+", k, v)
end

local function remove(st, kind, k)
  check_name(k)
  record(st, kind .. "-", k, "")
end

local METHODS = {
  AddHeader = function(_, st, k, v) add(st, st.primary, k, v) end,
  RemoveHeader = function(_, st, k) remove(st, st.primary, k) end,
  AddResponseHeader = function(_, st, k, v) add(st, "r", k, v) end,
  RemoveResponseHeader = function(_, st, k) remove(st, "r", k) end,
  ResponseWrite = function(_, st, data)
    if type(data) == "number" then data = tostring(data) end
    if type(data) ~= "string" then raw_error("ResponseWrite expects a string, got " .. type(data), 3) end
    local b = st.body
    if not b then b = {}; st.body = b end
    b[#b + 1] = data
  end,
  SetStatusCode = function(obj, _, code) obj.StatusCode = code end,
  -- the named upstream (server or group) that serves this request; checked when the hook returns
  SetUpstream = function(obj, st, name)
    if st.primary ~= "q" then raw_error("SetUpstream works in onHttpRequest only", 3) end
    if type(name) ~= "string" or name == "" then
      raw_error("SetUpstream expects an upstream name, got " .. tostring(name), 3)
    end
    obj.Upstream = name
    local ops, n = st.ops, st.n
    ops[n + 1], ops[n + 2], ops[n + 3] = "u", name, ""
    st.n = n + 3
  end,
}

-- Headers as the script sees them: the originals, minus what it removed, plus what it added
-- (built on first read, and again after an edit).
local function current_headers(st)
  local ops, n, primary, current = st.ops, st.n, st.primary, st.current
  local flat, m, removed = {}, 0, nil
  for i = 1, n, 3 do
    if ops[i] == primary .. "-" or ops[i] == primary .. "+" then
      removed = removed or {}
      removed[lower(ops[i + 1])] = true
    end
  end
  for i = 1, current.n, 2 do
    if not (removed and removed[lower(current[i])]) then flat[m + 1], flat[m + 2] = current[i], current[i + 1]; m = m + 2 end
  end
  for i = 1, n, 3 do
    if ops[i] == primary .. "+" then flat[m + 1], flat[m + 2] = ops[i + 1], ops[i + 2]; m = m + 2 end
  end
  return header_table(flat, m)
end

-- Roles: one "\n"-joined string from Python, a list of strings on first read. Claims: a loader
-- from Python (nil when there are none), called on first read. Plain tables: a script may change
-- its copy, which changes nothing else.
local function roles_table(text)
  local t, n = {}, 0
  for role in text:gmatch("[^\n]+") do n = n + 1; t[n] = role end
  return t
end

local function http_index(obj, st, key)
  if key == "Headers" then
    local h = st.headers
    if not h then h = current_headers(st); st.headers = h end
    return h
  end
  if key == "Roles" then
    local r = roles_table(st.roles)
    rawset(obj, "Roles", r)
    return r
  end
  if key == "Claims" then
    local c = st.claims and st.claims() or {}
    rawset(obj, "Claims", c)
    return c
  end
  local m = METHODS[key]
  if m then
    local bound = function(a, b, c)
      if a == obj then m(obj, st, b, c) else m(obj, st, a, b) end
    end
    rawset(obj, key, bound)
    return bound
  end
end

-- AddHeader/RemoveHeader replace (as the seed's SetHeader does): an added name hides the
-- original, so a script sees one value per name it set.
local function http_result(obj, st)
  local code = tointeger(tonumber(obj.StatusCode))
  if not code or code < 100 or code > 599 then
    raw_error("StatusCode must be a number from 100 to 599, got " .. tostring(obj.StatusCode), 0)
  end
  local data, kind = body_out(st.body and tconcat(st.body) or nil)
  return code, data, kind, unpack(st.ops, 1, st.n)
end

local function http_body(f, obj, st)
  local ret = f(obj)
  return ret, http_result(obj, st)
end

local function http_hook(until_, name, kind, scheme, method, path, query, ip, user, cert, roles, claims, status,
                         upstream, ...)
  local obj = { Scheme = scheme, Method = method, Path = path, QueryString = query, RemoteIp = ip,
    User = user, ClientCertificate = cert, StatusCode = status, Upstream = upstream }
  local st = { primary = kind == "request" and "q" or "r", current = pack(...), ops = {}, n = 0,
    roles = roles, claims = claims }
  raw_setmetatable(obj, { __index = function(o, key) return http_index(o, st, key) end })
  return start(until_, http_body, rawget(G, name), obj, st)
end

-- ------------------------------------------------------------------ the standard library, then setup
--@SANDBOX
--@SETUP
for i = 12, select("#", ...), 2 do
  local name, value = select(i, ...)
  G[name] = value
end

-- The GC was stopped while the engine was built (see LuaEngine): restart it with as much room
-- to allocate as the engine holds, as Lua itself would after a full cycle. A transient engine
-- usually ends before its first collection step; lua_close frees it all at once.
raw_collectgarbage("restart")
raw_collectgarbage("step", -math.ceil(raw_collectgarbage("count")))

-- Operations, by number (see LuaEngine in runtime.py). Global lookups here are raw: this runs on
-- the main thread, where no hook runs, so no metamethod of a script may run here.
local CALL, CALL_GLOBAL, RESUME, DROP, DEFINES, HTTP, LOAD, PART = 1, 2, 3, 4, 5, 6, 7, 8

local function entry(op, a, b, ...)
  if op == CALL_GLOBAL then return start(a, rawget(G, b), ...) end
  if op == HTTP then return http_hook(a, b, ...) end
  if op == CALL then return start(a, b, ...) end
  if op == RESUME then
    local w = threads[b]
    deadline, expired, current = a, false, w
    return finish(b, w, unbudgeted(co_resume(w, ...)))
  end
  if op == DROP then
    local w = threads[a]
    if w then threads[a] = nil retire(w) end
    return
  end
  if op == DEFINES then return type(rawget(G, a)) == "function" end
  if op == LOAD then
    local fn, err = load(b, ..., "bt")
    if not fn then return "compile", err end
    return start(a, fn)
  end
  if op == PART then return PRIVATE.stdlib(a) end
  raw_error("unknown operation " .. tostring(op))
end

local first = new_worker()
idle[1], nidle = first, 1
return entry, tostring(first)
