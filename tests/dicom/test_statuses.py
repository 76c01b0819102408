"""Units of dicomproxy.dicom.statuses: which C-STORE statuses are stored, retried or refused."""

from __future__ import annotations

import pytest

from dicomproxy.dicom.statuses import RetryRule, is_stored


def test_success_and_warnings_are_stored() -> None:
    assert all(is_stored(s) for s in (0x0000, 0x0001, 0xB000, 0xB006, 0xB007))
    assert not any(is_stored(s) for s in (0xA700, 0xA900, 0xC000, 0x0110, 0x0122))


def test_the_default_rule_retries_not_now_and_refuses_never() -> None:
    rule = RetryRule()
    assert all(rule.retried(s) for s in (0xA700, 0xA701, 0xA7FF, 0x0110, 0x0210, 0x0213))
    assert not any(rule.retried(s) for s in (0xA900, 0xA9FF, 0xC000, 0xC210, 0x0122, 0x0124, 0x0117, 0xA800))


def test_patterns_are_configurable_and_checked() -> None:
    assert RetryRule(["c2xx"]).retried(0xC210) and not RetryRule(["c2xx"]).retried(0xA700)
    with pytest.raises(ValueError, match="A7"):
        RetryRule(["A7"])
