"""Hypothesis budgets for tests/fuzz: a ``ci`` profile bounded for every CI run, ``long`` for campaigns.

Pick one with ``HYPOTHESIS_PROFILE`` (``ci`` when unset)::

    .venv/bin/python -m pytest -n 2 tests/fuzz                          # CI: a few minutes in all
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -n 2 tests/fuzz  # a campaign (README "Fuzzing")

The profiles are applied per test (:func:`fuzz_settings`), not loaded globally, so the rest of
the suite keeps Hypothesis's defaults. Each test states its example count under ``ci`` (what
one CI run can afford for it: a unit fuzzer runs thousands, a test through a gateway process
tens); ``long`` multiplies it by :data:`LONG_FACTOR` (``FUZZ_LONG_FACTOR`` overrides it) and
keeps what it finds in ``.hypothesis/`` so that the next run replays the failures first.

``ci`` is derandomized: every CI run tries the same examples (a regression suite that cannot
flake on a new random draw); new ground is the campaigns' job. Neither profile has a deadline:
this machine is shared and loaded, and a slow example is not a failure (the tests bound their
own waits).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE_VARIABLE = "HYPOTHESIS_PROFILE"
LONG_FACTOR = int(os.environ.get("FUZZ_LONG_FACTOR", "50"))
_SLOW_OK = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)

settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True, suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "long", deadline=None, derandomize=False, print_blob=True, suppress_health_check=_SLOW_OK,
    database=DirectoryBasedExampleDatabase(".hypothesis/fuzz"),
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
)
_FACTORS = {"ci": 1, "long": LONG_FACTOR}


def profile_name() -> str:
    name = os.environ.get(PROFILE_VARIABLE, "ci")
    if name not in _FACTORS:
        raise RuntimeError(f"{PROFILE_VARIABLE}={name!r}: the fuzz profiles are {', '.join(_FACTORS)}")
    return name


def fuzz_settings(examples: int, **overrides: Any) -> settings:
    """The active profile with ``examples`` examples under ``ci`` (scaled for ``long``)."""
    name = profile_name()
    return settings(settings.get_profile(name), max_examples=examples * _FACTORS[name], **overrides)
