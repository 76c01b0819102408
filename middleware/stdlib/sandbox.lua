-- The standard library as scripts see it (the README's "Lua trust model" has the table of what
-- is kept, restricted or removed, and why). Inserted into prelude.lua at --@SANDBOX: it shares
-- the prelude's locals and runs before any script, so the natives it hides stay reachable only
-- from the prelude and from stdlib/*.lua, which get them in K.
--
-- Two rules drive it. No script may reach past its engine: no Python bridge, no process, file,
-- environment or native-library access unless the site turns on full-library mode
-- (Lua:FullLibraries), and never the debug library's hooks, locals or registry. No script may
-- outrun its time budget: the count hook cannot fire inside one C function, so every C function
-- whose work a script controls beyond a few milliseconds is bounded before it is called or
-- replaced by steps the hook reaches (stdlib/strings.lua, tables.lua, chunks.lua).
--
-- It is cheap on purpose (a transient engine runs it for each request): string, table and
-- coroutine are empty tables that take each function on first access, the wrapped ones from
-- their part of stdlib/ (loaded then); K is built when the first part loads. Measured: making
-- every wrapper in every engine cost ~570,000 instructions per engine (callgrind); each object
-- made here costs ~1,000 (its allocation, and its freeing when the engine closes).
do
  local loaded = package.loaded
  local raw_string, raw_table, raw_coroutine, raw_os, raw_io, raw_debug, raw_package = string, table, coroutine, os,
    io, debug, package
  local MAIN = co_running()
  local K, groups
  local function load_code(name)
    local fn, err = load(PRIVATE._StdlibCode(name), "=" .. name, "b")
    if not fn then raw_error(err, 0) end
    return fn
  end
  local function group(name)
    if not K then  -- (kernel.lua names them; built on first need, not in every engine)
      groups = {}
      K = load_code("kernel")(BUDGET, budget_error, function() return expired end, rethrow, new_coroutine, forward,
        track, workers, MAIN, PRIVATE, full, script_root, path_prefix, native_path, hidden_env, raw_string, raw_table,
        raw_coroutine, raw_os, raw_io, raw_debug, raw_package, load, raw_pcall, raw_error, type, select, tostring,
        tonumber, rawget, raw_setmetatable, raw_getmetatable, math.type, math.tointeger, math.maxinteger, group,
        load_code, raw_collectgarbage)
    end
    local g = groups[name]
    if not g then
      g = load_code(name)(K)
      groups[name] = g
    end
    return g
  end
  -- (one function and one prototype for every stub: each prototype costs its allocations in
  -- every engine, a stub only its closure)
  local function stub(name, f) return function(...) return group(name)[f](...) end end
  PRIVATE.stdlib = group  -- (LuaEngine.stdlib_part: for the tests that compare the wrappers with the natives)

  -- Which part of stdlib/ wraps raw[key] (false: not available to scripts; nil: the native).
  local function part(raw, key)
    if raw == raw_string then
      if key == "find" or key == "match" or key == "gmatch" or key == "gsub" or key == "rep" then return "strings" end
      if key == "dump" and not full then return false end
    elseif raw == raw_table then
      if key == "insert" or key == "remove" or key == "move" or key == "concat" or key == "unpack" or key == "sort" then
        return "tables"
      end
    elseif key ~= "yield" then
      return "coroutines"
    end
  end
  -- A library table that takes each function on first access: the native one, or the wrapper.
  local function library(raw)
    return raw_setmetatable({}, {
      __index = function(t, key)
        local name, v = part(raw, key), nil
        if name then v = group(name)[key] elseif name == nil then v = raw[key] end
        if v ~= nil then rawset(t, key, v) end
        return v
      end,
      __pairs = function(t)
        for key in next, raw do local _ = t[key] end
        return next, t, nil
      end,
    })
  end
  local string, table, coroutine = library(raw_string), library(raw_table), library(raw_coroutine)
  G.string, G.table, G.coroutine = string, table, coroutine
  loaded.string, loaded.table, loaded.coroutine = string, table, coroutine
  raw_getmetatable("").__index = string  -- ("s"):find(p) goes through the wrappers too

  G.load, G.loadfile, G.dofile = stub("chunks", "load"), stub("chunks", "loadfile"), stub("chunks", "dofile")
  G.collectgarbage = stub("base", "collectgarbage")  -- run it, read its size; not stop or tune it
  -- A finalizer runs inside the collector with hooks off (lgc.c, GCTM), where no budget can stop
  -- it (measured: a __gc that loops hangs the process): scripts may not set one.
  G.setmetatable = function(t, mt)
    if type(t) == "table" and (mt == nil or type(mt) == "table" and rawget(mt, "__gc") == nil) then
      return raw_setmetatable(t, mt)
    end
    return group("base").setmetatable_refused(t, mt)
  end
  if rawget(G, "print") == raw_print then  -- a line of the log, not the process's stdout (a full pipe blocks)
    G.print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      PRIVATE._Print(raw_table.concat(parts, "\t"))
    end
  end

  local os = { time = raw_os.time, clock = raw_os.clock, date = raw_os.date, difftime = raw_os.difftime }
  local debug = { traceback = traceback, getinfo = stub("chunks", "getinfo") }
  G.os, G.debug, loaded.os, loaded.debug = os, debug, os, debug
  G.python, loaded.python = nil, nil
  -- for requireNative: native modules from Lua:NativePath only
  PRIVATE.native_module = stub("chunks", "native_module")
  if full then
    os.exit, os.remove, os.rename, os.tmpname = raw_os.exit, raw_os.remove, raw_os.rename, raw_os.tmpname
    os.execute, os.getenv = stub("full", "execute"), stub("full", "getenv")
    local io = {}
    for k, v in next, raw_io do io[k] = v end
    io.popen, io.type = stub("full", "popen"), stub("full", "type")
    G.io, loaded.io = io, io
    raw_package.path = path_prefix
    raw_package.cpath = native_path ~= "" and native_path .. ";" .. raw_package.cpath or raw_package.cpath
    raw_package.searchers[2] = stub("full", "lua_searcher")
  else
    G.io, loaded.io = nil, nil
    local package = { loaded = loaded, preload = raw_package.preload, path = path_prefix, config = raw_package.config }
    G.package, loaded.package = package, package
    G.require = stub("chunks", "require")
  end
end
