-- K: what the parts of stdlib/ get of the prelude (its budget state, the threads it reports,
-- the natives as they were before any script ran). Built by sandbox.lua when the first part
-- loads; the names are here rather than in the prelude, which every engine loads.
local BUDGET, budget_error, expired, rethrow, new_coroutine, forward, track, workers, MAIN, PRIVATE, full, script_root,
  path_prefix, native_path, hidden_env, string, table, coroutine, os, io, debug, package, load, pcall, error, type,
  select, tostring, tonumber, rawget, setmetatable, getmetatable, math_type, tointeger, maxinteger, group,
  load_code, collectgarbage = ...
return {
  BUDGET = BUDGET, budget_error = budget_error, expired = expired, rethrow = rethrow, new_coroutine = new_coroutine,
  forward = forward, track = track, workers = workers, MAIN = MAIN, PRIVATE = PRIVATE, full = full, script_root = script_root,
  path_prefix = path_prefix, native_path = native_path, hidden_env = hidden_env, string = string, table = table,
  coroutine = coroutine, os = os, io = io, debug = debug, package = package, load = load, pcall = pcall,
  error = error, type = type, select = select, tostring = tostring, tonumber = tonumber, rawget = rawget,
  setmetatable = setmetatable, getmetatable = getmetatable, group = group, load_code = load_code, collectgarbage = collectgarbage,
  math = { type = math_type, tointeger = tointeger, maxinteger = maxinteger },
}
