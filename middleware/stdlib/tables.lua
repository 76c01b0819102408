-- table.insert / remove / move / concat / unpack / sort as scripts see them (loaded on first use).
--
-- The C functions read and write through metamethods, and a C function can be a metamethod:
-- table.move(setmetatable({}, {__index = type}), 1, 2^40, 1, setmetatable({}, {__newindex =
-- rawequal})) runs 2^40 steps in one C call, where the count hook cannot fire (measured: it
-- never ended). So a table with a metatable is handled by the same steps written in Lua; a
-- plain table by the native function, except where its work is not bounded by what the table
-- holds: table.move over a range (table.move({}, 1, 2^40, 1, {}) walks 2^40 empty slots) and
-- table.sort's comparisons (with a C comparator, or on long strings, each comparison walks their
-- common prefix), which run in Lua or in pieces the hook reaches.
local K = ...
local B = K.group("base")
local type, select, pcall = K.type, K.select, K.pcall
local raw_getmetatable, raw_getinfo, raw_error = K.getmetatable, K.debug.getinfo, K.error
local t = K.table
local t_insert, t_remove, t_move, t_concat, t_unpack, t_sort = t.insert, t.remove, t.move, t.concat, t.unpack, t.sort
local format = K.string.format
local maxinteger = K.math.maxinteger
local argerror, check_table, check_function, opt_integer, check_integer, length, typename, reraise = B.argerror,
  B.check_table, B.check_function, B.opt_integer, B.check_integer, B.length, B.typename, B.reraise

local function plain(v) return raw_getmetatable(v) == nil end

local M = {}

function M.insert(list, ...)
  local nargs = select("#", ...)
  check_table(list, 1, "insert")
  local e = length(list) + 1
  if nargs == 1 then  -- appending is one write, with or without metamethods
    list[e] = ...
    return
  end
  if nargs ~= 2 then raw_error("wrong number of arguments to 'insert'", 2) end
  local pos = check_integer((...), 2, "insert")
  if pos < 1 or pos > e then argerror(3, 2, "insert", "position out of bounds") end
  if plain(list) then
    t_insert(list, pos, (select(2, ...)))
    return
  end
  for i = e, pos + 1, -1 do list[i] = list[i - 1] end
  list[pos] = select(2, ...)
end

function M.remove(list, pos)
  local size = length(check_table(list, 1, "remove"))
  if pos ~= nil then
    pos = opt_integer(pos, 2, "remove", size)
    if pos ~= size and (pos < 1 or pos > size + 1) then argerror(3, 2, "remove", "position out of bounds") end
  else
    pos = size
  end
  if plain(list) then return t_remove(list, pos) end
  local v = list[pos]
  while pos < size do
    list[pos] = list[pos + 1]
    pos = pos + 1
  end
  if pos <= size then list[pos] = nil end
  return v
end

function M.move(a1, f, e, to, a2)
  check_table(a1, 1, "move")
  f = check_integer(f, 2, "move")
  e = check_integer(e, 3, "move")
  to = check_integer(to, 4, "move")
  if a2 == nil then a2 = a1 else check_table(a2, 5, "move") end
  if e >= f then
    if not (f > 0 or e < maxinteger + f) then argerror(3, 3, "move", "too many elements to move") end
    local n = e - f + 1
    if to > maxinteger - n + 1 then argerror(3, 4, "move", "destination wrap around") end
    if n > 4096 or not (plain(a1) and plain(a2)) then
      if to > e or to > f or a1 ~= a2 then
        for i = 0, n - 1 do a2[to + i] = a1[f + i] end
      else
        for i = n - 1, 0, -1 do a2[to + i] = a1[f + i] end
      end
      return a2
    end
  end
  return t_move(a1, f, e, to, a2)
end

function M.concat(list, sep, i, j)
  if plain(check_table(list, 1, "concat")) then return t_concat(list, sep, i, j) end
  sep = sep == nil and "" or B.check_string(sep, 2, "concat")
  i = opt_integer(i, 3, "concat", 1)
  j = j == nil and length(list) or opt_integer(j, 4, "concat", nil)
  local parts, n = {}, 0
  for k = i, j do
    local v = list[k]
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" then
      raw_error(format("invalid value (at index %d) in table for 'concat'", k), 2)
    end
    n = n + 1
    parts[n] = v
  end
  return t_concat(parts, sep)
end

function M.unpack(list, i, j)
  if plain(check_table(list, 1, "unpack")) then return t_unpack(list, i, j) end
  i = opt_integer(i, 2, "unpack", 1)
  j = j == nil and length(list) or opt_integer(j, 3, "unpack", nil)
  if i > j then return end
  if j - i >= 1000000 then raw_error("too many results to unpack", 2) end
  local copy = {}
  for k = i, j do copy[k - i + 1] = list[k] end
  return t_unpack(copy, 1, j - i + 1)
end

-- Native sort only for a plain table of up to 1024 numbers or short strings with no comparator,
-- or with a comparator written in Lua (the hook runs inside it); otherwise the comparison is a
-- Lua function, and a table with a metatable is sorted as a copy.
local function lt(x, y) return x < y end

local function small_sortable(list, n)
  if n > 1024 then return false end
  for k = 1, n do
    local v = list[k]
    local tv = type(v)
    if tv ~= "number" and (tv ~= "string" or #v > 256) then return false end
  end
  return true
end

local function sort(list, comp, level)
  local ok, err = pcall(t_sort, list, comp)
  if not ok then reraise(err, level) end
end

function M.sort(list, comp)
  if type(list) ~= "table" then argerror(3, 1, "sort", "table expected, got " .. typename(list)) end
  local n = length(list)
  if n >= 2147483647 then argerror(3, 1, "sort", "array too big") end
  if comp ~= nil then
    check_function(comp, 2, "sort")
    if raw_getinfo(comp, "S").what == "C" then
      local c = comp
      comp = function(x, y) return c(x, y) end
    end
  elseif not (plain(list) and small_sortable(list, n)) then
    comp = lt
  end
  if plain(list) then
    if comp == nil then return t_sort(list) end
    return sort(list, comp, 2)
  end
  local copy = {}
  for k = 1, n do copy[k] = list[k] end
  sort(copy, comp, 3)
  for k = 1, n do list[k] = copy[k] end
end

return M
