-- Helpers of the standard library's wrappers (stdlib/*.lua): argument checks that raise the
-- native functions' own messages at the caller's line, and the re-raising of errors caught on
-- the way. Loaded in an engine with the first wrapper that needs it; K is what sandbox.lua
-- hands every part (the natives as they were before any script ran, and the budget's state).
local K = ...
local type, tostring, tonumber, rawget, raw_error = K.type, K.tostring, K.tonumber, K.rawget, K.error
local raw_getmetatable, raw_setmetatable = K.getmetatable, K.setmetatable
local format, gsub = K.string.format, K.string.gsub
local math_type, tointeger = K.math.type, K.math.tointeger
local BUDGET, budget_error, expired = K.BUDGET, K.budget_error, K.expired

local M = {}

function M.typename(v)
  local mt = raw_getmetatable(v)
  local name = mt and rawget(mt, "__name")
  if type(name) == "string" then return name end
  return type(v)
end
local typename = M.typename

-- level: 3 = the caller of the wrapper that calls argerror; 4 when a check_* helper calls it.
function M.argerror(level, n, fname, msg)
  raw_error(format("bad argument #%d to '%s' (%s)", n, fname, msg), level)
end
local argerror = M.argerror

function M.check_string(v, n, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  argerror(4, n, fname, "string expected, got " .. typename(v))
end

-- luaL_checkinteger: an integer, a float with an exact integer value, or a string of one.
local function to_integer(v, n, fname, level)
  if math_type(v) == "integer" then return v end
  if v == nil then argerror(level, n, fname, "number expected, got no value") end
  local x = type(v) == "string" and tonumber(v) or v
  if math_type(x) then
    local i = tointeger(x)
    if i then return i end
    argerror(level, n, fname, "number has no integer representation")
  end
  argerror(level, n, fname, "number expected, got " .. typename(v))
end

function M.opt_integer(v, n, fname, default)
  if v == nil then return default end
  local i = to_integer(v, n, fname, 5)  -- (not a tail call: the level counts this frame)
  return i
end

function M.check_integer(v, n, fname)
  local i = to_integer(v, n, fname, 5)
  return i
end

function M.check_table(v, n, fname)
  if type(v) ~= "table" then argerror(4, n, fname, "table expected, got " .. typename(v)) end
  return v
end

function M.check_function(v, n, fname)
  if type(v) ~= "function" then argerror(4, n, fname, "function expected, got " .. typename(v)) end
  return v
end

-- luaL_len: the length (through __len), which must be an integer.
function M.length(t)
  local n = #t
  if math_type(n) ~= "integer" then raw_error("object length is not an integer", 3) end
  return n
end

-- The Lua matcher's errors (the native matcher's messages, raised without a position) ...
local PATTERN_ERROR = {}
function M.fail(message) raw_error(raw_setmetatable({ message }, PATTERN_ERROR), 0) end

-- ... and an error caught by a wrapper's pcall, raised again: the budget stays the budget; the
-- matcher's errors and those of natives called from patterns.lua's lines
-- get the position of the wrapper's caller (level: the wrapper's depth); a script's own errors
-- (from a gsub replacement function, a sort comparator) pass unchanged.
function M.reraise(err, level)
  if err == BUDGET or expired() then budget_error() end
  if raw_getmetatable(err) == PATTERN_ERROR then raw_error(err[1], level + 1) end
  if type(err) == "string" then  -- (patterns.lua keeps its line numbers; the other parts are stripped)
    local stripped, n = gsub(err, "^patterns:%d+: ", "", 1)
    if n > 0 then raw_error(stripped, level + 1) end
  end
  raw_error(err, 0)
end

local GC_NATIVE = { stop = true, restart = true, incremental = true, generational = true, setpause = true,
  setstepmul = true }
local raw_collect = K.collectgarbage
function M.collectgarbage(opt, ...)
  if opt == nil or opt == "collect" or opt == "count" or opt == "step" or opt == "isrunning" then
    return raw_collect(opt, ...)
  end
  if GC_NATIVE[opt] then
    raw_error("collectgarbage(\"" .. opt .. "\") is not available to scripts: the gateway tunes the collector", 2)
  end
  argerror(3, 1, "collectgarbage", "invalid option '" .. tostring(opt) .. "'")
end

function M.setmetatable_refused(t, mt)  -- (tail-called by setmetatable)
  if type(t) ~= "table" then argerror(3, 1, "setmetatable", "table expected, got " .. typename(t)) end
  if type(mt) ~= "table" then argerror(3, 2, "setmetatable", "nil or table expected") end
  raw_error("setmetatable: a __gc metamethod is not available to scripts (a finalizer runs where no time "
    .. "budget can stop it)", 2)
end

return M
