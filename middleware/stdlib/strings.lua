-- string.find / match / gmatch / gsub / rep as scripts see them (loaded on first use).
--
-- The native matcher backtracks: string.find(("a"):rep(420), ".-.-.-b") ran 5.4 s in one C
-- call, where the count hook cannot fire. A cheap bound on its work decides: (start positions)
-- x (subject length + 1) per unbounded item that is not the last one x 2 per '?' item x the
-- pattern's length. At or under LIMIT units the native function runs, by a tail call (its
-- errors name the caller's line); over it, patterns.lua finds the same result in steps the
-- hook reaches. The worst case measured was ~3 ns per unit (a one-character set over 16 MB),
-- so a native call stays under ~13 ms; the bound is pessimistic for most patterns (".-.-b" ran
-- at 0.25 ns per unit). Cost on the hot path (a short subject): the wrapper's checks and one
-- table lookup of the pattern's analysis, see tests/middleware/test_patterns.py.
local K = ...
local B = K.group("base")
local type, select = K.type, K.select
local string = K.string
local byte, sub, raw_find, raw_match, raw_gmatch, raw_gsub, raw_rep = string.byte, string.sub, string.find,
  string.match, string.gmatch, string.gsub, string.rep
local math_type, maxinteger = K.math.type, K.math.maxinteger
local check_string, opt_integer, argerror, typename, raw_error = B.check_string, B.opt_integer, B.argerror,
  B.typename, K.error

local LIMIT = 4194304

local patterns
local function slow()
  if not patterns then
    patterns = K.load_code("patterns")({ K = K, LIMIT = LIMIT, reraise = B.reraise, fail = B.fail })
  end
  return patterns
end

-- The index after the single-character class at i, or nil when it is malformed.
local function class_end(p, i, n)
  local c = byte(p, i)
  if c == 37 then return i < n and i + 2 or nil end  -- '%x'
  if c ~= 91 then return i + 1 end
  local j = i + 1
  if byte(p, j) == 94 then j = j + 1 end
  repeat  -- the first character is part of the set, even a ']'
    if j > n then return nil end
    local d = byte(p, j)
    j = j + 1
    if d == 37 and j <= n then j = j + 1 end
  until byte(p, j) == 93
  return j + 1
end

local function literal(p, i, e)
  local c = byte(p, i)
  if e == i + 1 then
    if c == 46 or c == 91 then return false end  -- '.' or a set
    return sub(p, i, i)
  end
  if c == 37 and e == i + 2 and not raw_find(sub(p, i + 1, i + 1), "^%w") then return sub(p, i + 1, i + 1) end
  return false
end

-- What the bound needs of a pattern (its items from index i): q, the unbounded items but a last
-- one; opt, the '?' items; window, whether every item has a bounded length but a last one (then
-- a window of the subject answers exactly, see patterns.lua); first, a literal every match
-- starts with; plain, no special character at all (find then searches plainly).
local function analyze(p, i)
  local n = #p
  local q, opt, window, lead, first, depth, closed_twice = 0, 0, true, true, false, 0, false
  local tail = n  -- the last character that is not a ')': a quantifier there ends the pattern
  while tail > 0 and byte(p, tail) == 41 do tail = tail - 1 end
  while i <= n do
    local c, d = byte(p, i), byte(p, i + 1)
    if c == 40 then  -- '(' or a position capture '()'
      if d == 41 then
        window = false
        i = i + 2
      else
        depth = depth + 1
        i = i + 1
      end
    elseif c == 41 then
      depth = depth - 1
      if depth < 0 then closed_twice = true end
      i = i + 1
    elseif c == 36 and i == n then  -- '$' at the end
      window = false
      i = i + 1
    elseif c == 37 and d == 98 then  -- '%bxy'
      q, window, lead = q + 1, false, false
      i = i + 4
    elseif c == 37 and d == 102 then  -- '%f[set]'
      local e = byte(p, i + 2) == 91 and class_end(p, i + 2, n)
      if not e then
        window = false
        break
      end
      lead = false
      i = e
    elseif c == 37 and d and d >= 48 and d <= 57 then  -- a back-reference
      q, window, lead = q + 1, false, false
      i = i + 2
    else
      local e = class_end(p, i, n)
      if not e then  -- malformed: the native raises when it gets there
        window = false
        break
      end
      local s = byte(p, e)
      if s == 42 or s == 43 or s == 45 then  -- '*' '+' '-'
        if e ~= tail then q, window = q + 1, false end
        if lead and s == 43 then first = literal(p, i, e) end
        lead = false
        i = e + 1
      elseif s == 63 then  -- '?'
        opt, lead = opt + 1, false
        i = e + 1
      else
        if lead then first = literal(p, i, e) end
        lead = false
        i = e
      end
    end
  end
  -- unbalanced: a capture left open (or closed twice); the native raises only when it reaches it
  -- or pushes it, so such patterns go to the Lua matcher, which raises at the same moments
  local unbalanced = depth ~= 0 or closed_twice
  return { q = q, opt = opt, len = n > 0 and n or 1, window = window and not unbalanced, first = first,
    unbalanced = unbalanced, plain = not raw_find(p, "[%^%$%*%+%?%.%(%[%%%-]") }
end

local cache, gcache, ncache = {}, {}, 0
local function analysis(p, anchorable)
  local t = anchorable and cache or gcache
  local a = t[p]
  if a then return a end
  if ncache >= 512 then
    cache, gcache, ncache = {}, {}, 0
    t = anchorable and cache or gcache
  end
  if anchorable and byte(p, 1) == 94 then
    a = analyze(p, 2)
    a.anchored = true
  else
    a = analyze(p, 1)
  end
  ncache = ncache + 1
  t[p] = a
  return a
end

local function cost(a, m, anchored)
  local c = anchored and a.len or a.len * m
  for _ = 1, a.q do
    c = c * m
    if c > LIMIT then return c end
  end
  if a.opt > 0 then c = c * 2 ^ a.opt end
  return c
end

local function start_at(init, n, fname)
  init = opt_integer(init, 3, fname, 1)
  if init > 0 then return init end
  if init == 0 or -init > n then return 1 end
  return n + init + 1
end

local M = {}

-- (The four wrappers inline the common case, a pattern without unbounded items: they run on
-- the hot path, where each Lua call saved is ~5 % of the wrapper's cost.)
function M.find(s, p, init, plain)
  s = type(s) == "string" and s or check_string(s, 1, "find")
  p = type(p) == "string" and p or check_string(p, 2, "find")
  local n = #s
  init = init == nil and 1 or start_at(init, n, "find")
  local m = n - init + 2
  if m < 1 then m = 1 end
  local a = cache[p] or analysis(p, true)
  if plain or a.plain then
    if m * #p <= LIMIT then return raw_find(s, p, init, true) end
    return slow().find_plain(s, p, init)
  end
  local c = a.anchored and a.len or a.len * m
  if a.q > 0 or a.opt > 0 then c = cost(a, m, a.anchored) end
  if c <= LIMIT then return raw_find(s, p, init) end
  return slow().find(s, p, init, a, false)
end

function M.match(s, p, init)
  s = type(s) == "string" and s or check_string(s, 1, "match")
  p = type(p) == "string" and p or check_string(p, 2, "match")
  local n = #s
  init = init == nil and 1 or start_at(init, n, "match")
  local m = n - init + 2
  if m < 1 then m = 1 end
  local a = cache[p] or analysis(p, true)
  local c = a.anchored and a.len or a.len * m
  if a.q > 0 or a.opt > 0 then c = cost(a, m, a.anchored) end
  if c <= LIMIT then return raw_match(s, p, init) end
  return slow().find(s, p, init, a, true)
end

function M.gmatch(s, p, init)
  s = type(s) == "string" and s or check_string(s, 1, "gmatch")
  p = type(p) == "string" and p or check_string(p, 2, "gmatch")
  local n = #s
  init = init == nil and 1 or start_at(init, n, "gmatch")
  if init > n + 1 then init = n + 2 end  -- (as the native: past the end, nothing matches)
  local a = gcache[p] or analysis(p, false)
  if cost(a, n - init + 2, false) <= LIMIT then return raw_gmatch(s, p, init) end
  return slow().gmatch(s, p, init, a)
end

local REPL = { string = true, number = true, table = true, ["function"] = true }
function M.gsub(s, p, repl, max)
  s = type(s) == "string" and s or check_string(s, 1, "gsub")
  p = type(p) == "string" and p or check_string(p, 2, "gsub")
  if not REPL[type(repl)] then argerror(3, 3, "gsub", "string/function/table expected, got " .. typename(repl)) end
  local n = #s
  if max ~= nil then max = opt_integer(max, 4, "gsub", n + 1) end
  local a = cache[p] or analysis(p, true)
  local c = a.anchored and a.len or a.len * (n + 1)
  if a.q > 0 or a.opt > 0 then c = cost(a, n + 1, a.anchored) end
  if c <= LIMIT then return raw_gsub(s, p, repl, max) end
  return slow().gsub(s, p, repl, max or n + 1, a)
end

-- string.rep copies its piece once per repetition: string.rep("", 2^50) never ends, and 64 M
-- one-byte copies take ~0.2 s. An empty result returns at once; many small repetitions are
-- made from a 4 KB block (a few thousand long copies instead).
local function rep(s, n, sep)
  s = type(s) == "string" and s or check_string(s, 1, "rep")
  if math_type(n) ~= "integer" then
    if n == nil then argerror(3, 2, "rep", "number expected, got no value") end
    n = opt_integer(n, 2, "rep", nil)
  end
  if sep ~= nil then sep = check_string(sep, 3, "rep") else sep = "" end
  local l, ls = #s, #sep
  if n <= 0 or l + ls == 0 then return "" end
  if l + ls > maxinteger // n then raw_error("resulting string too large", 2) end
  if n <= 4096 or l + ls >= 1024 then return raw_rep(s, n, sep) end
  if ls > 0 then return rep(s .. sep, n - 1) .. s end
  local k = 4096 // l
  return raw_rep(raw_rep(s, k), n // k) .. raw_rep(s, n % k)
end
M.rep = rep

-- For the tests that compare the slow paths with the native functions on small inputs.
M.analysis = analysis
function M.patterns_with_limit(limit)
  return K.load_code("patterns")({ K = K, LIMIT = limit, reraise = B.reraise, fail = B.fail })
end

return M
