-- string.find / match / gmatch / gsub for the calls whose bound on the native matcher's work is
-- over LIMIT (see the pattern section of sandbox.lua). Loaded in an engine on first need. Every
-- strategy here gives exactly the native result; each runs as Lua steps between native calls of
-- at most LIMIT units, so the count hook (and the watchdog) can stop it:
--
-- * window: a pattern whose items all have a bounded length, but a last one (`%s+`, `[^\n]+`,
--   `"ID":"%d+"`), is searched with the native function on windows of the subject. A match that
--   starts in a window and ends before its end is the real one (every earlier attempt only read
--   inside the window); one that reaches the end is redone by the Lua matcher below.
-- * per start: otherwise each start position is tried with an anchored native call when one
--   attempt is within LIMIT, else with the Lua matcher; a literal first character is found with
--   a plain search (memchr) to skip positions that cannot match.
-- * matcher: the Lua matcher follows Lua 5.4's lstrlib.c step for step (same backtracking
--   order, same captures, same errors at the same moments), written for this file.
--
-- Measured (tests/middleware/test_patterns.py): see the README's "Lua trust model" for the
-- figures; window searches run at native speed plus one copy of the subject.
local env = ...
local K = env.K
local raw_find, raw_gsub, t_concat, LIMIT, reraise, fail = K.string.find, K.string.gsub, K.table.concat, env.LIMIT,
  env.reraise, env.fail
local byte, sub, char, format = K.string.byte, K.string.sub, K.string.char, K.string.format
local pack, unpack, type, tostring, pcall = K.table.pack, K.table.unpack, K.type, K.tostring, K.pcall

local MAXCCALLS, MAXCAPTURES = 200, 32
local CAP_UNFINISHED, CAP_POSITION = -1, -2

-- ------------------------------------------------------------------ the Lua matcher
local CLASSES = { [97] = true, [99] = true, [100] = true, [103] = true, [108] = true, [112] = true, [115] = true,
  [117] = true, [119] = true, [120] = true }  -- a c d g l p s u w x (and z, handled apart)
local members = {}  -- class letter -> { [byte] = boolean }, from the native matcher (C locale)

local function class_members(letter)
  local t = members[letter]
  if not t then
    t = {}
    local pat = "^%" .. char(letter)
    for c = 0, 255 do t[c] = raw_find(char(c), pat) ~= nil end
    members[letter] = t
  end
  return t
end

local function match_class(c, cl)
  local low = (cl >= 65 and cl <= 90) and cl + 32 or cl
  local res
  if CLASSES[low] then
    res = class_members(low)[c]
  elseif low == 122 then  -- %z
    res = c == 0
  else
    return cl == c
  end
  if cl == low then return res end
  return not res
end

local function bracket(p, c, i, ec)  -- i: the '[', ec: the closing ']'
  local sig = true
  if byte(p, i + 1) == 94 then
    sig = false
    i = i + 1
  end
  i = i + 1
  while i < ec do
    local d = byte(p, i)
    if d == 37 then
      if match_class(c, byte(p, i + 1)) then return sig end
      i = i + 2
    elseif byte(p, i + 1) == 45 and i + 2 < ec then
      if d <= c and c <= byte(p, i + 2) then return sig end
      i = i + 3
    else
      if d == c then return sig end
      i = i + 1
    end
  end
  return not sig
end

local function class_end(ms, i)
  local p, pn = ms.p, ms.pn
  local c = byte(p, i)
  i = i + 1
  if c == 37 then
    if i > pn then fail("malformed pattern (ends with '%')") end
    return i + 1
  end
  if c == 91 then
    if byte(p, i) == 94 then i = i + 1 end
    repeat
      if i > pn then fail("malformed pattern (missing ']')") end
      local d = byte(p, i)
      i = i + 1
      if d == 37 and i <= pn then i = i + 1 end
    until byte(p, i) == 93
    return i + 1
  end
  return i
end

local function single(ms, si, pi, ep)
  if si > ms.n then return false end
  local c = byte(ms.s, si)
  local pc = byte(ms.p, pi)
  if pc == 46 then return true end
  if pc == 37 then return match_class(c, byte(ms.p, pi + 1)) end
  if pc == 91 then return bracket(ms.p, c, pi, ep - 1) end
  return pc == c
end

local match

local function max_expand(ms, si, pi, ep)
  local i = 0
  while single(ms, si + i, pi, ep) do i = i + 1 end
  while i >= 0 do
    local r = match(ms, si + i, ep + 1)
    if r then return r end
    i = i - 1
  end
  return nil
end

local function min_expand(ms, si, pi, ep)
  while true do
    local r = match(ms, si, ep + 1)
    if r then return r end
    if not single(ms, si, pi, ep) then return nil end
    si = si + 1
  end
end

local function start_capture(ms, si, pi, what)
  local level = ms.level
  if level >= MAXCAPTURES then fail("too many captures") end
  ms.init[level + 1], ms.len[level + 1] = si, what
  ms.level = level + 1
  local r = match(ms, si, pi)
  if not r then ms.level = ms.level - 1 end
  return r
end

local function end_capture(ms, si, pi)
  local l = ms.level
  while l >= 1 and ms.len[l] ~= CAP_UNFINISHED do l = l - 1 end
  if l < 1 then fail("invalid pattern capture") end
  ms.len[l] = si - ms.init[l]
  local r = match(ms, si, pi)
  if not r then ms.len[l] = CAP_UNFINISHED end
  return r
end

local function match_capture(ms, si, digit)
  local l = digit - 48
  if l < 1 or l > ms.level or ms.len[l] == CAP_UNFINISHED then fail(format("invalid capture index %%%d", l)) end
  local len = ms.len[l]
  if len < 0 or ms.n - si + 1 < len then return nil end
  local start = ms.init[l]
  if sub(ms.s, si, si + len - 1) == sub(ms.s, start, start + len - 1) then return si + len end
  return nil
end

local function match_balance(ms, si, pi)
  if pi >= ms.pn then fail("malformed pattern (missing arguments to '%b')") end
  if si > ms.n or byte(ms.s, si) ~= byte(ms.p, pi) then return nil end
  local b, e = byte(ms.p, pi), byte(ms.p, pi + 1)
  local depth = 1
  for i = si + 1, ms.n do
    local c = byte(ms.s, i)
    if c == e then
      depth = depth - 1
      if depth == 0 then return i + 1 end
    elseif c == b then
      depth = depth + 1
    end
  end
  return nil
end

-- One item with an optional suffix ('*', '+', '-', '?'); returns (si, pi) to go on with the next
-- item, or (result, nil) when the match of the rest is decided here.
local function default_item(ms, si, pi)
  local ep = class_end(ms, pi)
  local suffix = byte(ms.p, ep)
  if not single(ms, si, pi, ep) then
    if suffix == 42 or suffix == 63 or suffix == 45 then return si, ep + 1 end  -- accepts empty
    return nil, nil
  end
  if suffix == 63 then
    local r = match(ms, si + 1, ep + 1)
    if r then return r, nil end
    return si, ep + 1
  end
  if suffix == 43 then return max_expand(ms, si + 1, pi, ep), nil end
  if suffix == 42 then return max_expand(ms, si, pi, ep), nil end
  if suffix == 45 then return min_expand(ms, si, pi, ep), nil end
  return si + 1, ep
end

match = function(ms, si, pi)
  if ms.depth == 0 then fail("pattern too complex") end
  ms.depth = ms.depth - 1
  local p, pn = ms.p, ms.pn
  while si and pi and pi <= pn do
    local c, d = byte(p, pi), byte(p, pi + 1)
    if c == 40 then
      if d == 41 then si = start_capture(ms, si, pi + 2, CAP_POSITION)
      else si = start_capture(ms, si, pi + 1, CAP_UNFINISHED) end
      pi = nil
    elseif c == 41 then
      si, pi = end_capture(ms, si, pi + 1), nil
    elseif c == 36 and pi == pn then
      if si ~= ms.n + 1 then si = nil end
      pi = nil
    elseif c == 37 and d == 98 then
      si = match_balance(ms, si, pi + 2)
      pi = pi + 4
    elseif c == 37 and d == 102 then
      pi = pi + 2
      if byte(p, pi) ~= 91 then fail("missing '[' after '%f' in pattern") end
      local ep = class_end(ms, pi)
      local previous = si == 1 and 0 or byte(ms.s, si - 1)
      local current = byte(ms.s, si) or 0
      if not bracket(p, previous, pi, ep - 1) and bracket(p, current, pi, ep - 1) then pi = ep else si = nil end
    elseif c == 37 and d and d >= 48 and d <= 57 then
      si = match_capture(ms, si, d)
      pi = pi + 2
    else
      si, pi = default_item(ms, si, pi)
    end
  end
  ms.depth = ms.depth + 1
  return si
end

local function new_state(s, p)
  return { s = s, n = #s, p = p, pn = #p, level = 0, init = {}, len = {}, depth = MAXCCALLS }
end

-- What the native find(s, "^" .. p, i) returns: start, end, captures (none when there is no
-- capture); nil when there is no match at i. A capture left open is UNFINISHED: the native raises
-- "unfinished capture" only when it hands that capture out (see captures()).
local UNFINISHED = {}
local function lua_at(ms, i)
  ms.level = 0
  local e = match(ms, i, 1)
  if not e then return nil end
  local out = { i, e - 1, n = 2 + ms.level }
  for k = 1, ms.level do
    local len = ms.len[k]
    if len == CAP_UNFINISHED then
      out[2 + k] = UNFINISHED
    elseif len == CAP_POSITION then
      out[2 + k] = ms.init[k]
    else
      out[2 + k] = sub(ms.s, ms.init[k], ms.init[k] + len - 1)
    end
  end
  return out
end

local function captures(r, from, to)  -- r[from..to], raising as the native does for an open one
  for k = from, to do
    if r[k] == UNFINISHED then fail("unfinished capture") end
  end
  return unpack(r, from, to)
end

-- ------------------------------------------------------------------ searching
-- A search: the subject, the pattern without its anchor, its analysis (sandbox.lua), and the
-- window kept from the last search (gmatch and gsub search many times in the same text).
local function searcher(s, p, a)
  local n = #s
  local q = { s = s, p = p, a = a, n = n, ap = "^" .. p, ws = nil, lo = 0, from = 0, wend = 0, to = 0, ms = nil }
  q.per_start = a.len * 2 ^ a.opt
  for _ = 1, a.q do q.per_start = q.per_start * (n + 2) end
  q.window_inits = LIMIT // a.len
  if q.window_inits < 1 then q.window_inits = 1 end
  return q
end

local function matcher(q)
  if not q.ms then q.ms = new_state(q.s, q.p) end
  return q.ms
end

local function attempt(q, i)  -- one anchored attempt at i
  if q.per_start <= LIMIT and not q.a.unbalanced then
    local r = pack(raw_find(q.s, q.ap, i))
    if r[1] then return r end
    return nil
  end
  return lua_at(matcher(q), i)
end

local function window_search(q, i)
  local s, n, len = q.s, q.n, q.a.len
  while i <= n + 1 do
    if (n - i + 2) * len <= LIMIT then  -- the rest is one native call
      local r = pack(raw_find(s, q.p, i))
      if r[1] then return r end
      return nil
    end
    if not (q.ws and i >= q.lo and i <= q.wend) then
      q.lo = i
      q.from = i > 1 and i - 1 or 1  -- one character before: a frontier (%f) looks back
      q.wend = i + q.window_inits - 1
      q.to = q.wend + len + 1
      if q.to > n then q.to = n end
      q.ws = sub(s, q.from, q.to)
    end
    local off = q.from - 1
    local r = pack(raw_find(q.ws, q.p, i - off))
    local start = r[1]
    if start and start + off <= q.wend then
      if q.to == n or r[2] + off < q.to then
        r[1], r[2] = start + off, r[2] + off
        return r
      end
      return lua_at(matcher(q), start + off)  -- reaches the window's end: its last item may go on
    end
    i = q.wend + 1
  end
  return nil
end

-- The first match at a start position >= i: (start, end, captures...) packed, or nil.
local function search(q, i)
  if q.a.window then return window_search(q, i) end
  local s, n, first = q.s, q.n, q.a.first
  while i <= n + 1 do
    if first then
      i = raw_find(s, first, i, true)
      if not i then return nil end
    end
    local r = attempt(q, i)
    if r then return r end
    i = i + 1
  end
  return nil
end

-- ------------------------------------------------------------------ the functions
local M = {}

local function finish(ok, ...)
  if not ok then reraise((...), 2) end
  return ...
end

local function find(s, p, init, a, is_match)
  local q = searcher(s, a.anchored and sub(p, 2) or p, a)
  local r
  if a.anchored then r = attempt(q, init) else r = search(q, init) end
  if not r then return nil end
  if not is_match then return r[1], r[2], captures(r, 3, r.n) end
  if r.n == 2 then return sub(s, r[1], r[2]) end
  return captures(r, 3, r.n)
end
function M.find(s, p, init, a, is_match) return finish(pcall(find, s, p, init, a, is_match)) end

local function find_plain(s, p, init)
  local n, m = #s, #p
  if m == 0 then return init, init - 1 end
  local step = LIMIT // m
  local i = init
  if step >= 1 then
    while i <= n - m + 1 do
      local last = i + step - 1 + m - 1
      local start = raw_find(last >= n and s or sub(s, i, last), p, last >= n and i or 1, true)
      if start then
        if last < n then start = start + i - 1 end
        return start, start + m - 1
      end
      if last >= n then return nil end
      i = i + step
    end
    return nil
  end
  local c = sub(p, 1, 1)  -- a needle longer than LIMIT: compare at each place its first byte is
  while true do
    i = raw_find(s, c, i, true)
    if not i or i > n - m + 1 then return nil end
    if sub(s, i, i + m - 1) == p then return i, i + m - 1 end
    i = i + 1
  end
end
function M.find_plain(s, p, init) return finish(pcall(find_plain, s, p, init)) end

local function gmatch_step(g)
  local q = g.q
  while g.src <= q.n + 1 do
    local r = search(q, g.src)
    if not r then
      g.src = q.n + 2
      return nil
    end
    local e = r[2] + 1
    if e == g.last then  -- an empty match where the last one ended: move on, as the native does
      g.src = r[1] + 1
    else
      g.src, g.last = e, e
      if r.n == 2 then return sub(q.s, r[1], r[2]) end
      return captures(r, 3, r.n)
    end
  end
  return nil
end
function M.gmatch(s, p, init, a)
  if byte(p, 1) == 94 then p = "%" .. p end  -- gmatch takes a leading '^' literally; find would anchor
  local g = { q = searcher(s, p, a), src = init, last = nil }
  return function() return finish(pcall(gmatch_step, g)) end
end

-- gsub's output: pieces joined into a chunk every 1024, so that a subject with a million matches
-- does not hold a million small strings (measured: 4 MB with "%s+" ran out of a 64 MB cap).
local function new_output() return { n = 0, chunks = {} } end

local function put(out, piece)
  local n = out.n + 1
  out[n] = piece
  if n < 1024 then
    out.n = n
  else
    out.chunks[#out.chunks + 1] = t_concat(out, "", 1, n)
    out.n = 0
  end
end

local function joined(out)
  out.chunks[#out.chunks + 1] = t_concat(out, "", 1, out.n)
  return t_concat(out.chunks)
end

local function add_string(out, repl, s, r)
  local i = 1
  while true do
    local j = raw_find(repl, "%", i, true)
    if not j then
      put(out, sub(repl, i))
      return
    end
    put(out, sub(repl, i, j - 1))
    local d = byte(repl, j + 1)
    if d == 37 then
      put(out, "%")
    elseif d == 48 then
      put(out, sub(s, r[1], r[2]))
    elseif d and d >= 49 and d <= 57 then
      local l = d - 48
      if l <= r.n - 2 then
        put(out, tostring((captures(r, 2 + l, 2 + l))))
      elseif l == 1 then
        put(out, sub(s, r[1], r[2]))
      else
        fail(format("invalid capture index %%%d", l))
      end
    else
      fail("invalid use of '%' in replacement string")
    end
    i = j + 2
  end
end

local function add_value(out, repl, kind, s, r)
  if kind == "string" or kind == "number" then
    add_string(out, kind == "number" and tostring(repl) or repl, s, r)
    return true
  end
  local v
  if kind == "function" then
    if r.n == 2 then v = repl(sub(s, r[1], r[2])) else v = repl(captures(r, 3, r.n)) end
  else
    v = repl[r.n == 2 and sub(s, r[1], r[2]) or captures(r, 3, 3)]
  end
  if not v then
    put(out, sub(s, r[1], r[2]))
    return false
  end
  if type(v) ~= "string" and type(v) ~= "number" then fail("invalid replacement value (a " .. type(v) .. ")") end
  put(out, type(v) == "number" and tostring(v) or v)
  return true
end

local function gsub(s, p, repl, max, a)
  local q = searcher(s, a.anchored and sub(p, 2) or p, a)
  local kind = type(repl)
  local out, src, last, count, changed = new_output(), 1, nil, 0, false
  while count < max do
    local r
    if a.anchored then r = attempt(q, src) else r = search(q, src) end
    if not r then break end
    local e = r[2] + 1
    if e == last then  -- an empty match where the last one ended: keep one character and go on
      if r[1] > q.n then break end
      put(out, sub(s, src, r[1]))
      src = r[1] + 1
    else
      if r[1] > src then put(out, sub(s, src, r[1] - 1)) end
      count = count + 1
      changed = add_value(out, repl, kind, s, r) or changed
      src, last = e, e
    end
    if a.anchored then break end
  end
  if not changed then return s, count end
  put(out, sub(s, src))
  return joined(out), count
end
function M.gsub(s, p, repl, max, a) return finish(pcall(gsub, s, p, repl, max, a)) end

M.lua_find = function(s, p, init)  -- the Lua matcher alone, for the tests that compare it with the native
  if not raw_find(p, "[%^%$%*%+%?%.%(%[%%%-]") then return M.find_plain(s, p, init) end
  local anchored = byte(p, 1) == 94
  local ms = new_state(s, anchored and sub(p, 2) or p)
  local function run()
    for i = init, #s + 1 do
      local r = lua_at(ms, i)
      if r then return r[1], r[2], captures(r, 3, r.n) end
      if anchored then break end
    end
    return nil
  end
  return finish(pcall(run))
end

return M
