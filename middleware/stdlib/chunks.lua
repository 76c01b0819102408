-- load, loadfile, dofile, require and debug.getinfo as scripts see them (loaded on first use).
--
-- Chunks are text only, in every mode: Lua does not check bytecode, and crafted bytecode can
-- read and write any memory of the runtime, the deadline included. A long source goes to the
-- parser 64 KB at a time through a reader (a Lua function, so the hook runs between pieces);
-- load() would return the budget error raised there as a value, so it is raised again.
--
-- Files: in the default mode dofile/loadfile read only under the scripts folder
-- (ExtraConfig:ScriptsRoot), never through a '..' step; require loads Lua modules from the
-- scripts folder and the system's Lua folders and native ones from Lua:NativePath, whatever
-- package.path says (a script cannot point it at a folder it filled). Native modules are
-- machine code: nothing of the sandbox applies to them. In full-library mode any path, still
-- as text and in pieces.
local K = ...
local B = K.group("base")
local type, select, tostring, raw_error = K.type, K.select, K.tostring, K.error
local string = K.string
local byte, sub, format, find, gsub = string.byte, string.sub, string.format, string.find, string.gsub
local raw_load, raw_open, raw_getinfo = K.load, K.io.open, K.debug.getinfo
local searchpath, loadlib = K.package.searchpath, K.package.loadlib
local full, script_root, native_path, budget_error, expired = K.full, K.script_root, K.native_path, K.budget_error,
  K.expired
local check_string, argerror, typename = B.check_string, B.argerror, B.typename

local PIECE = 65536

local function pieces(s)
  local pos = 1
  return function()
    local piece = sub(s, pos, pos + PIECE - 1)
    pos = pos + PIECE
    return piece
  end
end

local function split_reader(f)
  local buf, pos = "", 1
  return function()
    if pos > #buf then
      local piece = f()
      if type(piece) ~= "string" or #piece <= PIECE then return piece end
      buf, pos = piece, 1
    end
    local out = sub(buf, pos, pos + PIECE - 1)
    pos = pos + PIECE
    return out
  end
end

-- level: of the caller, for the argument error
local function load_text(chunk, name, mode, env, has_env, level)
  if mode ~= nil and type(mode) == "string" and not find(mode, "t", 1, true) then
    return nil, "binary chunks are not available to scripts (mode '" .. mode .. "')"
  end
  local t = type(chunk)
  if t == "string" then
    if #chunk > PIECE then
      if name == nil then name = chunk end
      chunk = pieces(chunk)
    end
  elseif t == "function" then
    chunk = split_reader(chunk)
    if name == nil then name = "=(load)" end
  else
    argerror(level, 1, "load", "string expected, got " .. typename(chunk))
  end
  local fn, err
  if has_env then fn, err = raw_load(chunk, name, "t", env) else fn, err = raw_load(chunk, name, "t") end
  if expired() then budget_error() end
  return fn, err
end

local function allowed_path(path)
  if full then return path end
  if script_root == "" then return nil end
  if byte(path, 1) ~= 47 then path = script_root .. "/" .. path end
  if find("/" .. path .. "/", "/../", 1, true) then return nil end
  if sub(path, 1, #script_root + 1) ~= script_root .. "/" then return nil end
  return path
end

-- The text of a script file (BOM and '#!' line dropped, as luaL_loadfile does) and its chunk name.
local function read_source(path, fname)
  if path == nil then raw_error(fname .. " without a file name reads standard input: not available to scripts", 3) end
  path = check_string(path, 1, fname)
  local full_path = allowed_path(path)
  if not full_path then
    return nil, "cannot open " .. path .. " (scripts may load files only from the scripts folder, "
      .. "ExtraConfig:ScriptsRoot)"
  end
  local f, err = raw_open(full_path, "rb")
  if not f then return nil, "cannot open " .. err end
  local text = f:read("a")
  f:close()
  if sub(text, 1, 3) == "\239\187\191" then text = sub(text, 4) end
  if byte(text, 1) == 35 then text = gsub(text, "^[^\n]*", "", 1) end
  return text, "@" .. full_path
end

local M = {}

function M.load(chunk, name, mode, ...)
  return load_text(chunk, name, mode, (...), select("#", ...) > 0, 3)
end

function M.loadfile(path, mode, ...)
  local text, name = read_source(path, "loadfile")
  if not text then return nil, name end
  return load_text(text, name, mode, (...), select("#", ...) > 0, 3)
end

function M.dofile(path)
  local text, name = read_source(path, "dofile")
  if not text then raw_error(name, 2) end
  local fn, err = load_text(text, name)
  if not fn then raw_error(err, 2) end
  return fn()
end

function M.native_module(name, level)
  local path, err = searchpath(name, native_path)
  if not path then return nil, err end
  local f, lerr = loadlib(path, "luaopen_" .. gsub(gsub(name, "^[^%-]*%-", "", 1), "%.", "_"))
  if not f then raw_error(format("error loading module '%s' from file '%s':\n\t%s", name, path, lerr), level) end
  return f, path
end

function M.text_module(name, path_list, level)
  local path, err = searchpath(name, path_list)
  if not path then return nil, err end
  local text, chunkname = read_source(path, "require")
  local f, lerr = text and load_text(text, chunkname)
  if not f then
    raw_error(format("error loading module '%s' from file '%s':\n\t%s", name, path, lerr or chunkname), level)
  end
  return f, path
end

-- Lua modules from the scripts folder and the system's Lua folders (the stock path without its
-- './' entries: LuaEngine passes it), native ones from Lua:NativePath.
local lua_path = K.path_prefix

function M.require(name)
  name = check_string(name, 1, "require")
  local loaded = K.package.loaded
  local v = loaded[name]
  if v then return v end
  local loader, data = K.package.preload[name], ":preload:"
  if not loader then
    local err
    loader, data = M.text_module(name, lua_path, 3)
    if not loader then
      err = data
      loader, data = M.native_module(name, 3)
      if not loader then
        raw_error(format("module '%s' not found:\n\tno field package.preload['%s']\n\t%s\n\t%s", name, name, err,
          data), 2)
      end
    end
  end
  local r = loader(name, data)
  if r ~= nil then loaded[name] = r elseif loaded[name] == nil then loaded[name] = true end
  return loaded[name], data
end

-- The read-only part of debug.getinfo: no function ('f'), no lines table ('L'), no thread.
function M.getinfo(f, what)
  if type(f) == "thread" then raw_error("debug.getinfo of another coroutine is not available to scripts", 2) end
  if what == nil then what = "lnStu" else what = gsub(check_string(what, 2, "getinfo"), "[fL>]", "") end
  if type(f) == "number" then
    local info = raw_getinfo(f + 1, what)  -- (+1: this wrapper's own frame)
    return info
  end
  if type(f) ~= "function" then argerror(3, 1, "getinfo", "function or level expected") end
  return raw_getinfo(f, what)
end

return M
