"""The Lua walk through the ``SharedDict`` API that every binding must pass: the synchronous
exports over memory (tests/scripting/test_shared.py) and the awaited ones over Redis
(tests/scripting/test_shared_redis.py). One text, so the two bindings are held to the same
answers and a change to the API is checked on both."""

from __future__ import annotations

_WALK = """
      assert(SharedDict:set("a", "x") == true)
      assert(SharedDict:get("a") == "x")
      assert(SharedDict.get("a") == "x")                      -- a dot works too
      local ok, err = SharedDict:add("a", "y")
      assert(ok == false and err == "exists")
      assert(SharedDict:incr("n", 2, 10) == 12)
      assert(SharedDict:incr("n") == 13)
      local v, e = SharedDict:incr("missing", 1)
      assert(v == nil and e == "not found")
      SharedDict:set("t", { list = { 1, 2 }, name = "CT", flag = true })
      local t = SharedDict:get("t")
      assert(t.name == "CT" and t.list[2] == 2 and t.flag == true)
@MORE@
      SharedDict:delete("a")
      assert(SharedDict:get("a") == nil)
      local keys = SharedDict:keys()
      table.sort(keys)
      return table.concat(keys, ",")
"""


def lua_api_walk(more: str = "") -> str:
    """The walk's Lua code: set, get, add, incr, a table value, then ``more`` (a binding's own
    checks, with ``n`` at 13 and ``t`` set), then delete and keys; it returns the keys left,
    sorted and joined by commas (``"n,t"`` plus whatever ``more`` stored)."""
    return _WALK.replace("@MORE@", more)
