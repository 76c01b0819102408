-- What full-library mode (Lua:FullLibraries) adds: os.execute, os.exit, os.getenv, os.remove,
-- os.rename, os.tmpname, the io library, string.dump, and require/loadfile/dofile on any path.
--
-- os.execute and io.popen do not call system()/popen(), which block the event loop until the
-- program ends (os.execute("sleep 3") stopped every HTTP and DICOM client): they are awaited
-- exports (shell.py), the loop serves everyone else meanwhile, and the time budget still ends
-- them. os.getenv does not show the variables named by hidden_env (the gateway's DICOMPROXY__*
-- secrets), nor do the programs started get them. What stays as Lua has it, and is the site's
-- decision: os.exit ends the gateway; io reaches every file the gateway's user can, and reading
-- a slow file (a FIFO, a network mount) blocks the loop; io.read() reads the gateway's stdin.
local K = ...
local B = K.group("base")
local type, select, tostring, tonumber, raw_error = K.type, K.select, K.tostring, K.tonumber, K.error
local raw_getmetatable, raw_setmetatable = K.getmetatable, K.setmetatable
local sub, find, gsub, upper = K.string.sub, K.string.find, K.string.gsub, K.string.upper
local concat, pack, unpack = K.table.concat, K.table.pack, K.table.unpack
local math_type = K.math.type
local PRIVATE, hidden_env = K.PRIVATE, K.hidden_env
local check_string, argerror = B.check_string, B.argerror

local M = {}

local raw_getenv = K.os.getenv
function M.getenv(name)
  name = check_string(name, 1, "getenv")
  if hidden_env ~= "" and sub(upper(name), 1, #hidden_env) == hidden_env then return nil end
  return raw_getenv(name)
end

local function status(kind, code)
  return (kind == "exit" and code == 0) or nil, kind, code
end

function M.execute(command)
  if command == nil then return true end
  return status(PRIVATE._Shell(check_string(command, 1, "execute")))
end

-- io.popen: the program runs to its end on the first read (mode "r") or at close (mode "w", with
-- what was written as its input); the object has the file methods scripts use.
local POPEN = { __name = "FILE*" }
POPEN.__index = POPEN

local function run(f)
  if not f.done then
    f.out, f.kind, f.code = PRIVATE._Popen(f.command, f.mode, concat(f.input))
    f.done, f.pos = true, 1
  end
end

local function read_one(f, what)
  local buf, pos = f.out, f.pos
  if math_type(what) == "integer" then
    if pos > #buf and what > 0 then return nil end
    f.pos = pos + what
    return sub(buf, pos, pos + what - 1)
  end
  local w = sub(gsub(tostring(what), "^%*", "", 1), 1, 1)
  if w == "a" then
    f.pos = #buf + 1
    return sub(buf, pos)
  end
  if pos > #buf then return nil end
  if w == "n" then
    local s, e = find(buf, "^%s*[-+]?[%w%.]+", pos)
    local v = s and tonumber(sub(buf, s, e))
    if v then f.pos = e + 1 end
    return v
  end
  if w ~= "l" and w ~= "L" then argerror(4, 1, "read", "invalid format") end
  local e = find(buf, "\n", pos, true) or #buf + 1
  f.pos = e + 1
  return sub(buf, pos, w == "L" and e or e - 1)
end

function POPEN.read(f, ...)
  if f.closed then raw_error("attempt to use a closed file", 2) end
  if f.mode ~= "r" then return nil, "Bad file descriptor", 9 end
  run(f)
  local n = select("#", ...)
  if n == 0 then return read_one(f, "l") end
  local out = {}
  for i = 1, n do
    out[i] = read_one(f, (select(i, ...)))
    if out[i] == nil then return unpack(out, 1, i) end
  end
  return unpack(out, 1, n)
end

function POPEN.lines(f, ...)
  local formats = pack(...)
  return function() return f:read(unpack(formats, 1, formats.n)) end
end

function POPEN.write(f, ...)
  if f.closed then raw_error("attempt to use a closed file", 2) end
  if f.mode ~= "w" then return nil, "Bad file descriptor", 9 end
  for i = 1, select("#", ...) do f.input[#f.input + 1] = check_string((select(i, ...)), i, "write") end
  return f
end

function POPEN.close(f)
  if f.closed then raw_error("attempt to use a closed file", 2) end
  f.closed = true
  run(f)
  return status(f.kind, f.code)
end

function POPEN.flush(f) return f end
function POPEN.setvbuf() return true end
function POPEN.seek() return nil, "Illegal seek", 29 end

function M.popen(command, mode)
  command = check_string(command, 1, "popen")
  mode = mode == nil and "r" or check_string(mode, 2, "popen")
  if mode ~= "r" and mode ~= "w" then argerror(3, 2, "popen", "invalid mode") end
  return raw_setmetatable({ command = command, mode = mode, input = {}, done = false, closed = false }, POPEN)
end

local raw_type = K.io.type
function M.type(f)
  if raw_getmetatable(f) == POPEN then return f.closed and "closed file" or "file" end
  return raw_type(f)
end

-- Lua modules through package.path as text only (the native searcher takes bytecode too).
function M.lua_searcher(name)
  local f, path = K.group("chunks").text_module(name, K.package.path, 4)
  if not f then return path end
  return f, path
end

return M
