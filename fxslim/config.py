"""Frozen, validated configuration objects that round-trip through dicts and short strings.

Every pass is configured by a frozen dataclass deriving from ``Config``. ``__post_init__`` calls
``validate()``, which raises ``ValueError`` naming the field, the allowed values and the value
received. ``from_string("httm:q=0.2,kv=0.3")`` parses the CLI/backend form (the part before the
colon is the registered name and is checked); ``to_dict``/``from_dict`` carry a ``version``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal

__all__ = ["Config", "check_range", "check_choice", "check_int"]


def check_range(cfg: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError unless ``low <= cfg.name <= high`` (open ends when asked)."""
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{type(cfg).__name__}.{name}: expected {lo}{name}{hi}, got {value!r}")


INT64_MAX = 2**63 - 1  # ints reach custom ops as int64: larger ones would fail there, unnamed


def check_int(cfg: Any, name: str, low: int | None = None, high: int | None = INT64_MAX) -> None:
    """Raise ValueError unless ``cfg.name`` is an int in [low, high] (high defaults to int64's max)."""
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{type(cfg).__name__}.{name}: expected an integer, got {value!r}")
    shown = high if high != INT64_MAX or value > INT64_MAX else None  # int64's bound only when crossed
    check_range(cfg, name, low, shown)


def check_choice(cfg: Any, name: str, choices: tuple) -> None:
    """Raise ValueError unless ``cfg.name`` is one of ``choices``."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name}: expected one of {choices}, got {value!r}")


def _parse_value(text: str, hint: Any, where: str) -> Any:
    """Convert one string value to the field's annotated type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(hint)):
            return None
        errors = []
        for option in options:
            try:
                return _parse_value(text, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{where}: expected one of {choices}, got {text!r}")
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1] or (str,)
        parts = [p for p in text.replace("+", " ").replace("/", " ").split() if p]
        return tuple(_parse_value(p, item, where) for p in parts)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {text!r}") from None
    if hint is float:
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if hint is str:
        return text
    raise ValueError(f"{where}: cannot parse a value of type {hint!r} from a string")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for frozen configs: validation on construction, dict and string round trips."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for out-of-range fields (subclasses override)."""

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        data = dict(data)
        name = data.pop("name", cls.name)
        version = data.pop("version", cls.version)
        if name != cls.name:
            raise ValueError(f"{cls.__name__}.from_dict: expected name {cls.name!r}, got {name!r}")
        if version != cls.version:
            raise ValueError(f"{cls.__name__}.from_dict: expected version {cls.version}, got {version!r}")
        return cls(**cls._check_keys(data))

    @classmethod
    def _check_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        fields = cls._hints()
        out = {}
        for key, value in data.items():
            key = cls.aliases.get(key, key)
            if key not in fields:
                allowed = sorted(set(fields) | set(cls.aliases))
                raise ValueError(f"{cls.__name__}: unknown option {key!r}; allowed: {', '.join(allowed)}")
            out[key] = value
        return out

    @classmethod
    def from_string(cls, spec: str) -> Config:
        """Parse ``"name"`` or ``"name:key=value,key=value"`` (the name must be this config's)."""
        head, _, body = spec.strip().partition(":")
        if head.strip().lower() != cls.name:
            raise ValueError(f"{cls.__name__}.from_string: expected a spec starting with {cls.name!r}, got {spec!r}")
        hints = cls._hints()
        raw: dict[str, str] = {}
        items = [p.strip() for p in body.split(",")] if body.strip() else []
        for item in items:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"{cls.__name__}.from_string: expected key=value, got {item!r} in {spec!r}")
            key = key.strip()
            name = cls.aliases.get(key, key)
            if any(cls.aliases.get(k, k) == name for k in raw):  # "L=14,L=3" or "L=14,l=3": which one was meant?
                raise ValueError(f"{cls.__name__}.from_string: option {name!r} given twice in {spec!r}")
            raw[key] = value.strip()
        raw = cls._check_keys(raw)
        values = {k: _parse_value(v, hints[k], f"{cls.__name__}.{k}") for k, v in raw.items()}
        return cls(**values)

    def to_string(self) -> str:
        """The short form, listing only fields that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                text = "+".join(map(str, value)) if isinstance(value, tuple) else str(value)
                parts.append(f"{f.name}={text}")
        return self.name + (":" + ",".join(parts) if parts else "")
