"""string.find / match / gmatch / gsub / rep as scripts see them (middleware/stdlib/strings.lua and
patterns.lua): the same results and errors as Lua's own functions, on every path (native, window
search, per-start attempts, the Lua matcher), and no call that outruns its budget.

Each case runs in a plain lupa runtime (the native functions) and in an engine: through the
wrappers, through the slow paths with small limits (so that small inputs take them), and through
the Lua matcher alone. Results are compared as text; error messages without their position.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dicomproxy_middleware import LuaEngine, LuaTimeoutError, Watchdog
from dicomproxy_middleware.runtime import lupa

HARNESS = r"""
local format, concat, pack, unpack = string.format, table.concat, table.pack, table.unpack
local function ser(...)
  local out = {}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    out[i] = type(v) == "string" and format("%q", v) or tostring(v)
  end
  return concat(out, ",")
end
local function try(f, ...)
  local r = pack(pcall(f, ...))
  if r[1] then return ser(unpack(r, 2, r.n)) end
  local m = tostring(r[2])
  return "E:" .. (m:gsub("^[^\n]-:%d+: ", ""))
end
function run_all(impl, s, p, init)
  local out = {}
  out[1] = try(impl.find, s, p, init)
  out[2] = try(impl.match, s, p, init)
  out[3] = try(function()
    local t = {}
    for a, b in impl.gmatch(s, p, init) do
      t[#t + 1] = ser(a, b)
      if #t > 100 then break end
    end
    return concat(t, ";")
  end)
  out[4] = try(impl.gsub, s, p, "<%0>")
  out[5] = try(impl.gsub, s, p, function(a, b) if b then return a .. "|" .. tostring(b) end end)
  out[6] = try(impl.gsub, s, p, { a = "A", b = false, [""] = "E" }, 3)
  out[7] = try(impl.gsub, s, p, "%1%%")
  out[8] = try(impl.find, s, p, init, true)
  return concat(out, "\n")
end
function find_only(f, s, p, init) return try(f, s, p, init) end
-- every subject x start, one text
function run_many(impl, subjects, inits, p)
  local out = {}
  for i = 1, #subjects do
    for j = 1, inits.n do out[#out + 1] = run_all(impl, subjects[i], p, inits[j]) end
  end
  return concat(out, "\n--\n")
end
function find_many(f, subjects, p)
  local out = {}
  for i = 1, #subjects do out[i] = try(f, subjects[i], p, 1) end
  return concat(out, "\n--\n")
end
"""

# An impl table over the slow paths of one patterns.lua instance (SLOW) with the wrappers' own
# argument handling (the slow paths take a normalized start).
SLOW_IMPL = r"""
return function(SLOW, analysis)
  local function start(init, n)
    init = init or 1
    if init > 0 then return init end
    if init == 0 or -init > n then return 1 end
    return n + init + 1
  end
  local impl = {}
  function impl.find(s, p, init, plain)
    init = start(init, #s)
    if init > #s + 1 then return nil end
    local a = analysis(p, true)
    if plain or a.plain then return SLOW.find_plain(s, p, init) end
    return SLOW.find(s, p, init, a, false)
  end
  function impl.match(s, p, init)
    init = start(init, #s)
    if init > #s + 1 then return nil end
    return SLOW.find(s, p, init, analysis(p, true), true)
  end
  function impl.gmatch(s, p, init)
    init = start(init, #s)
    if init > #s + 1 then init = #s + 2 end
    return SLOW.gmatch(s, p, init, analysis(p, false))
  end
  function impl.gsub(s, p, repl, max)
    return SLOW.gsub(s, p, repl, max or #s + 1, analysis(p, true))
  end
  return impl
end
"""

SUBJECTS = [
    "", "a", "aaa", "hello world", "x(a(b)c)y", "  a  b  ", "a.b-c", "aXbXc", "a\0b\0", "abcabcabc", "aaab",
    "ab12cd34 ef", "[]^$%", "ab" * 20, "a" * 30 + "b", "key=value; k2=v2", "THE the ThE",
]
PATTERNS = [
    "", "a", "a*", "a+", "a-", "a?", ".", ".-", ".*", "^a", "^$", "$", "a$", "(a)", "()", "(a)(b)", "(a*(.)%w(%s*))",
    "%a+", "%d+", "[a-c]+", "[^a]", "[]]", "[^]]", "[%]]", "[%a_]+", "%bxy", "%b()", "%f[%w]%w+", "%f[%W]", "(a)%1",
    "(.)%1", "%%", "a.b", "a%.b", "a%-b", "%s*$", "^%s*", "(%w+)=(%w+)", "(h)(e)(l)(l)(o)", "x*y*z*", "[a-", "%",
    "(", ")", "%1", "(()", "%b", "%f", "%fx", "[^", "%w+%s", "(%a+)%s*(%a*)", "^(.-)%s*$", ".-b", "a.-b.-", "[%w%.]-c",
    "%u%l+", "%x%x", "%c", "%p+", "%z", "[%z]", "^%^", "%^", "a+$", "(ab)+", "a?b?c?", "%W+", "[^%s]+$",
]
INITS: list[int | None] = [None, 2, -3, 100]
LIMITS = [1, 16, 256]


@pytest.fixture(scope="module")
def native() -> Any:
    rt = lupa.LuaRuntime(encoding=None)
    rt.execute(HARNESS)
    return rt


@pytest.fixture(scope="module")
def engine() -> Iterator[LuaEngine]:
    e = LuaEngine("patterns", timeout_ms=0)
    asyncio.run(e.load(HARNESS, "harness.lua"))
    strings = e.stdlib_part("strings")
    make = e.compile(SLOW_IMPL, "slow_impl.lua")
    impls = {"wrapped": e.globals.string}
    (factory,) = asyncio.run(e.run(make))
    for limit in LIMITS:
        (impls[f"slow{limit}"],) = asyncio.run(e.run(factory, strings.patterns_with_limit(limit), strings.analysis))
    e.impls = impls  # type: ignore[attr-defined]
    e.lua_find = strings.patterns_with_limit(1).lua_find  # type: ignore[attr-defined]
    yield e
    e.release()


def run_in(engine: LuaEngine, fn: Any, *args: Any) -> Any:
    (out,) = asyncio.run(engine.run(fn, *args))
    return out


def text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def first_difference(expected: str, got: str) -> str:
    cases = [f"{s!r} init={init}" for s, init in itertools.product(SUBJECTS, INITS)]
    for case, e, g in zip(cases, expected.split("\n--\n"), got.split("\n--\n"), strict=False):
        if e != g:
            return f"{case}\nexpected:\n{e}\ngot:\n{g}"
    return "(same cases)"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_path_gives_the_native_results(native: Any, engine: LuaEngine, pattern: str) -> None:
    subjects = native.table_from([s.encode("latin-1") for s in SUBJECTS])
    inits = native.eval("table.pack(...)", *INITS)
    expected = text(native.globals().run_many(native.globals().string, subjects, inits, pattern.encode("latin-1")))
    e_subjects = engine.lua.table_from(SUBJECTS)
    e_inits = engine.lua.eval("table.pack(...)", *INITS)
    for name, impl in engine.impls.items():  # type: ignore[attr-defined]
        got = text(run_in(engine, engine.globals.run_many, impl, e_subjects, e_inits, pattern))
        assert got == expected, f"{name}: pattern {pattern!r}: {first_difference(expected, got)}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_lua_matcher_alone_gives_the_native_find(native: Any, engine: LuaEngine, pattern: str) -> None:
    subjects = native.table_from([s.encode("latin-1") for s in SUBJECTS])
    expected = text(native.globals().find_many(native.globals().string.find, subjects, pattern.encode("latin-1")))
    got = text(run_in(engine, engine.globals.find_many, engine.lua_find, engine.lua.table_from(SUBJECTS),  # type: ignore[attr-defined]
                      pattern))
    assert got == expected, f"pattern {pattern!r}\nexpected: {expected}\ngot: {got}"


LONG_CASES = [
    # (subject built in Lua, pattern, what it exercises)
    ('("ab "):rep(200000)', "%s+", "window search, many matches"),
    ('("x"):rep(300000) .. "needle" .. ("y"):rep(10)', "ne+dle", "window search, the match past the first window"),
    ('("a"):rep(2000000)', "a+", "a match longer than a window (the Lua matcher finishes it)"),
    ('("k=v;"):rep(100000)', "(%w+)=(%w+)", "captures through windows"),
    ('("a"):rep(3000) .. "b"', "a.-b", "per-start attempts"),
    ('("ab"):rep(100000) .. "c"', "b(a)%1", "back-reference, per start"),
]


@pytest.mark.parametrize(("subject", "pattern", "what"), LONG_CASES)
def test_long_subjects_give_the_native_results(native: Any, engine: LuaEngine, subject: str, pattern: str,
                                               what: str) -> None:
    code = f"return function(impl) local s = {subject} return run_all(impl, s, {pattern!r}, 1) end"
    expected = text(native.execute(code)(native.globals().string))
    fn = run_in(engine, engine.compile(code, "long.lua"))
    got = text(run_in(engine, fn, engine.globals.string))
    assert got == expected, what


def test_a_slow_gsub_with_many_matches_fits_the_memory_cap() -> None:
    """The slow gsub joins its pieces every 1024: a million small strings at once ran a 64 MB
    engine out of memory on a 4 MB subject. Here a 16 MB engine, a 1 MB subject with 350,000
    matches, and a limit that sends it down the slow path."""
    engine = LuaEngine("gsub-memory", timeout_ms=0, max_memory_mb=16)
    try:
        strings = engine.stdlib_part("strings")
        slow = strings.patterns_with_limit(16)
        fn = engine.compile('local slow, analysis = ... local s = ("ab "):rep(350000) '
                            'local r, n = slow.gsub(s, "%s+", "_", #s + 1, analysis("%s+", true)) '
                            'return r == ("ab_"):rep(350000), n', "gsub_memory.lua")
        same, count = asyncio.run(engine.run(fn, slow, strings.analysis))
    finally:
        engine.release()
    assert (same, count) == (True, 350000)


def run_timed(engine: LuaEngine, code: str, timeout_ms: int) -> tuple[float, BaseException | None]:
    fn = engine.compile(code, "attack.lua")
    started = time.monotonic()
    try:
        asyncio.run(engine.run(fn, timeout_ms=timeout_ms))
    except BaseException as e:  # noqa: BLE001 - the test looks at which
        return time.monotonic() - started, e
    return time.monotonic() - started, None


ATTACKS = [
    'string.find(("a"):rep(420), ".-.-.-b")',  # the issue's: 5.4 s in one native call
    'string.match(("a"):rep(5000), "^(.-)(.-)(.-)b")',
    'for _ in string.gmatch(("a"):rep(3000), ".-.-b") do end',
    'string.gsub(("a"):rep(3000), "a.-a.-b", "x")',
    'local s = ("a"):rep(2^22) string.find(s .. s, s .. "b", 1, true)',  # plain search, O(n * m)
    'string.find(("z"):rep(2^23), "[' + "abcdefghijklmnopqrstuvwxy" * 20 + ']")',  # a long set at every place
    'string.rep("", 2^50)',
    'string.rep("x", 2^25) string.rep("x", 2^25) string.rep("x", 2^25)',
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_pattern_attacks_stop_within_the_budget(attack: str) -> None:
    engine = LuaEngine("attack", timeout_ms=300, max_memory_mb=128, watchdog=Watchdog(lupa))
    try:
        code = f"{attack} while true do end"  # one that ended in time runs into the loop
        elapsed, error = run_timed(engine, code, 300)
    finally:
        engine.release()
    assert isinstance(error, LuaTimeoutError), error
    assert elapsed < 0.3 + 0.4, f"{attack}: stopped after {elapsed:.2f} s"


def test_the_hot_path_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a pass/fail on time (the machine is shared): prints the wrapper's cost per call against
    the native's, for the README, and checks the results agree."""
    code = r"""
    local path = "/dicom-web/studies/1.2.840.113619.2.55.3/series/1.3.12.2.1107/instances"
    local f = ...
    local t0 = os.clock()
    local r
    for _ = 1, 200000 do
      r = f(path, "^/dicom%-web/studies/([^/]+)/series/([^/]+)")
      r = f(path, "/instances$")
      r = f(path, "series", 1, true)
    end
    return os.clock() - t0, r
    """
    native = lupa.LuaRuntime()
    native_time, native_r = native.execute(code, native.globals().string.find)
    engine = LuaEngine("cost", timeout_ms=0)
    try:
        fn = engine.compile(code, "cost.lua")
        (find,) = asyncio.run(engine.run(engine.compile("return string.find", "f.lua")))
        wrapped_time, wrapped_r = asyncio.run(engine.run(fn, find))
    finally:
        engine.release()
    assert wrapped_r == native_r
    with capsys.disabled():
        print(f"\nstring.find on a 74-byte path, 3 patterns: native {native_time / 600000 * 1e9:.0f} ns/call, "
              f"wrapped {wrapped_time / 600000 * 1e9:.0f} ns/call ({wrapped_time / native_time:.1f}x)")
    assert wrapped_time < native_time * 50
