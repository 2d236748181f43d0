"""Configs: validation errors name the field, strings and dicts round-trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from fxslim.config import Config, check_choice, check_int, check_range


@dataclass(frozen=True)
class _Cfg(Config):
    name = "demo"
    ratio: float = 0.5
    count: int = 3
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    limit: int | None = None
    aliases = {"r": "ratio"}

    def validate(self) -> None:
        check_range(self, "ratio", 0.0, 1.0, high_open=True)
        check_int(self, "count", 1)
        check_choice(self, "mode", ("a", "b"))


def test_config_from_string_parses_types_and_aliases():
    cfg = _Cfg.from_string("demo:r=0.25,count=4,mode=b,flag=true,sizes=3+4,limit=none")
    assert cfg == _Cfg(ratio=0.25, count=4, mode="b", flag=True, sizes=(3, 4), limit=None)
    assert _Cfg.from_string("demo:ratio=2/3").ratio == pytest.approx(2 / 3)
    assert _Cfg.from_string("demo") == _Cfg()


def test_config_round_trips_through_dict_and_string():
    cfg = _Cfg(ratio=0.1, count=7, sizes=(5,))
    assert _Cfg.from_dict(cfg.to_dict()) == cfg
    assert _Cfg.from_string(cfg.to_string()) == cfg
    assert cfg.to_dict()["version"] == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("demo:ratio=1.5", r"_Cfg.ratio: expected 0.0 <= ratio < 1.0, got 1.5"),
        ("demo:count=0", r"_Cfg.count: expected 1 <= count, got 0"),
        ("demo:count=2.5", r"_Cfg.count: expected an integer, got '2.5'"),
        ("demo:mode=c", r"_Cfg.mode: expected one of \('a', 'b'\), got 'c'"),
        ("demo:flag=maybe", r"_Cfg.flag: expected true/false"),
        ("demo:speed=3", r"unknown option 'speed'; allowed: count, flag, limit, mode, r, ratio, sizes"),
        ("demo:ratio", r"expected key=value"),
        ("demo:ratio=0.1,ratio=0.2", r"option 'ratio' given twice"),  # was: the last one, silently
        ("demo:ratio=0.1,r=0.2", r"option 'ratio' given twice"),  # an alias of it
        ("demo:ratio=0.1,,count=2", r"expected key=value, got ''"),
        ("other:ratio=0.1", r"expected a spec starting with 'demo'"),
    ],
)
def test_config_bad_values_raise_value_error_naming_field(spec, message):
    with pytest.raises(ValueError, match=message):
        _Cfg.from_string(spec)


def test_config_is_frozen_and_validates_direct_construction():
    cfg = _Cfg()
    with pytest.raises(AttributeError):
        cfg.ratio = 0.2  # type: ignore[misc]
    with pytest.raises(ValueError, match="ratio"):
        _Cfg(ratio=-0.1)
    with pytest.raises(ValueError, match="version"):
        _Cfg.from_dict({"name": "demo", "version": 99})
