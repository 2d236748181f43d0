"""Counting conventions: operand formats, accumulator widths, what energy and storage include.

By default every op is counted in the format of its node's dtype (fp32, fp16, bf16, int8, ...),
and fxslim ops state their own formats (a ternary conv is additions with int8 operands). ``deploy``
instead asks "what would this float model cost as deployed": a format per MAC-bearing node
(conv, linear, matmul, attention) resolved with one precedence, highest first:

1. the module name, exact, then glob patterns (``"features.18.*"``) in the order given;
2. ``"last:<kind>"``: the last node of that kind in execution order (``"last:linear"`` is the
   classifier of a CNN, ``"last:pointwise_conv"`` MobileNetV2's final 1×1 conv);
3. the node's kind, written bare or as ``"kind:<kind>"`` (kinds: ``KINDS``);
4. ``"default"``.

``"params"`` gives the format of the other parameters (biases, norm affines, embeddings). Presets:
``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"`` and ``"prom"`` (1×1 convs ternary, attention fp32 as
convert keeps it, the rest int8),
each with options ``last_pointwise=``, ``classifier=``, ``params=``, e.g.
``"prom:last_pointwise=int8,classifier=fp16"``; or a plain ``"pointwise_conv=ternary,default=int8"``.

Defaults worth knowing: int8 MACs add into a 32-bit accumulator; ternary MACs too unless
``ternary_accumulator_bits`` says otherwise; bias additions, requantization (one multiply per
output element of a quantized layer), elementwise work and memory traffic are all *off* in the
energy; storage counts per-output-channel scales of quantized weights at ``metadata_bits``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from fxslim.config import Config, check_choice, check_int

__all__ = ["Conventions", "FORMATS", "KINDS", "PACKINGS", "format_bits", "deploy_preset", "parse_deploy", "merge_conventions"]

FORMATS = ("fp64", "fp32", "fp16", "bf16", "int32", "int16", "int8", "int4", "ternary")
KINDS = ("conv", "pointwise_conv", "depthwise_conv", "grouped_conv", "transposed_conv", "linear", "attention", "matmul")
PACKINGS = {"2bit": 2.0, "base3": 1.6, "log2_3": 1.584962500721156, "nibble": 4.0, "int8": 8.0}
_BITS = {"fp64": 64, "fp32": 32, "fp16": 16, "bf16": 16, "int64": 64, "int32": 32, "int16": 16, "int8": 8,
         "int4": 4, "bool": 8}
_PRESETS: dict[str, dict[str, str]] = {
    "fp32": {"default": "fp32", "params": "fp32"},
    "fp16": {"default": "fp16", "params": "fp16"},
    "bf16": {"default": "bf16", "params": "bf16"},
    "int8": {"default": "int8", "params": "fp16"},
    # attention and other products of two activations (einsum, bmm): PROM's convert keeps them float islands (fp32)
    "prom": {"kind:pointwise_conv": "ternary", "kind:attention": "fp32", "kind:matmul": "fp32", "default": "int8",
             "params": "fp16"},
}
_PRESET_OPTIONS = {"last_pointwise": "last:pointwise_conv", "classifier": "last:linear", "params": "params"}


def format_bits(fmt: str, packing: str = "2bit") -> float:
    """Bits per value of a format (ternary: per the packing)."""
    if fmt == "ternary":
        return PACKINGS[packing]
    if fmt not in _BITS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    return _BITS[fmt]


def _check_format(where: str, fmt: Any) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{where}: expected a format in {FORMATS}, got {fmt!r}")
    return fmt


def deploy_preset(name: str, **options: str) -> dict[str, str]:
    """The deploy mapping of a preset (``"fp16"``, ``"int8"``, ``"prom"``, ...) with its options."""
    if name not in _PRESETS:
        raise ValueError(f"deploy: expected a preset in {tuple(_PRESETS)} or a mapping, got {name!r}")
    out = dict(_PRESETS[name])
    for key, fmt in options.items():
        if key not in _PRESET_OPTIONS:
            raise ValueError(f"deploy: unknown option {key!r} for preset {name!r}; allowed: {tuple(_PRESET_OPTIONS)}")
        out[_PRESET_OPTIONS[key]] = _check_format(f"deploy option {key}", fmt)
    return out


def parse_deploy(spec: str | Mapping[str, str]) -> dict[str, str]:
    """A normalised deploy mapping from a preset string or a mapping (keys: see the module docs)."""
    if isinstance(spec, str):
        head, colon, body = spec.partition(":")
        if colon and head.strip() not in _PRESETS and "=" in head + body.partition(",")[0]:
            head, colon, body = "", "", spec  # 'last:linear=fp16,default=int8': keys with a colon, no preset
        if not spec.strip():
            raise ValueError(f"deploy: expected a preset {tuple(_PRESETS)}, 'preset:key=value,...' or "
                             "'kind=format,...', got an empty string (None: no deploy)")
        pairs = {}
        for item in filter(None, (p.strip() for p in (body if colon else spec).split(","))):
            key, eq, value = item.partition("=")
            if not eq:  # a preset alone: not an item of a list ('int8,', 'fp16,conv=int8' dropped it)
                if colon or item not in _PRESETS or spec.strip() != item:
                    raise ValueError(f"deploy: expected a preset {tuple(_PRESETS)}, 'preset:key=value,...' or "
                                     f"'kind=format,...', got {spec!r}")
                continue
            if key.strip() in pairs:  # the last one won, silently
                raise ValueError(f"deploy: {key.strip()!r} is given twice in {spec!r}")
            pairs[key.strip()] = value.strip()
        if colon or head.strip() in _PRESETS:
            return deploy_preset(head.strip(), **pairs)
        spec = pairs
    if not isinstance(spec, Mapping):
        raise TypeError(f"deploy: expected a preset string or a mapping of key -> format, got {type(spec).__name__}")
    out = {}
    for key, fmt in spec.items():
        key = str(key)
        if key in KINDS:
            key = f"kind:{key}"
        elif key.startswith(("kind:", "last:")) and key.split(":", 1)[1] not in KINDS:
            raise ValueError(f"deploy: {key!r} names no kind; kinds are {KINDS}")
        if key in out:  # 'conv' and 'kind:conv'
            raise ValueError(f"deploy: {key!r} is given twice")
        out[key] = _check_format(f"deploy[{key!r}]", fmt)
    return out


@dataclasses.dataclass(frozen=True)
class Conventions(Config):
    """How counts turn into arithmetic, energy and storage (see the module docstring)."""

    name = "conventions"

    deploy: str | Mapping[str, str] | None = None
    accumulator_bits: int = 32
    ternary_accumulator_bits: int | None = None
    skip_zero_weights: bool = False
    zero_fraction: float | None = None
    include_bias: bool = False
    include_requant: bool = False
    requant_format: str = "int32"
    include_elementwise: bool = False
    include_memory: bool = False
    memory_level: str = "sram_32kb"
    ternary_packing: str = "2bit"
    metadata_bits: int = 16

    def validate(self) -> None:
        if self.deploy is not None:
            parse_deploy(self.deploy)
        check_choice(self, "accumulator_bits", (8, 16, 32))
        check_choice(self, "ternary_accumulator_bits", (None, 8, 16, 32))
        zf = self.zero_fraction
        if zf is not None and not (isinstance(zf, (int, float)) and 0 <= zf <= 1):
            raise ValueError(f"Conventions.zero_fraction: expected None or 0 <= zero_fraction <= 1, got {zf!r}")
        check_choice(self, "requant_format", FORMATS)
        check_choice(self, "ternary_packing", tuple(PACKINGS))
        check_int(self, "metadata_bits", 0, 64)
        for flag in ("skip_zero_weights", "include_bias", "include_requant", "include_elementwise", "include_memory"):
            check_choice(self, flag, (False, True))

    # ------------------------------------------------------------------------------------------

    @property
    def deploy_map(self) -> dict[str, str]:
        return parse_deploy(self.deploy) if self.deploy is not None else {}

    def unmatched_names(self, fqns: Iterable[str]) -> list[str]:
        """The deploy keys that name modules (not kinds, ``last:``, ``default``, ``params``) and match
        none of ``fqns``, exactly or as a glob: a misspelt key (``pointwise`` for the kind
        ``pointwise_conv``) otherwise changes nothing, silently."""
        fqns = set(fqns)
        names = [k for k in self.deploy_map if not k.startswith(("kind:", "last:")) and k not in ("default", "params")]
        return [k for k in names if k not in fqns and not any(fnmatch.fnmatchcase(f, k) for f in fqns)]

    def mac_format(self, fqn: str, kind: str, is_last: bool) -> str | None:
        """The deployed operand format of a MAC-bearing node, or None (keep the node's own)."""
        mapping = self.deploy_map
        if not mapping:
            return None
        names = [k for k in mapping if not k.startswith(("kind:", "last:")) and k not in ("default", "params")]
        if fqn in names:
            return mapping[fqn]
        for key in names:
            if any(c in key for c in "*?[") and fnmatch.fnmatchcase(fqn, key):
                return mapping[key]
        if is_last and f"last:{kind}" in mapping:
            return mapping[f"last:{kind}"]
        return mapping.get(f"kind:{kind}", mapping.get("default"))

    @property
    def params_format(self) -> str | None:
        """The deployed format of non-weight parameters (None = their dtype)."""
        return self.deploy_map.get("params")

    @property
    def last_kinds(self) -> set[str]:
        return {k.split(":", 1)[1] for k in self.deploy_map if k.startswith("last:")}

    def accumulator(self, fmt: str) -> int:
        """Accumulator width (bits) of an integer or ternary MAC."""
        if fmt == "ternary" and self.ternary_accumulator_bits is not None:
            return self.ternary_accumulator_bits
        return self.accumulator_bits

    def describe(self) -> str:
        """The conventions a number was computed under, as one line (defaults included)."""
        deploy = self.deploy if isinstance(self.deploy, str) else (
            ",".join(f"{k}={v}" for k, v in self.deploy_map.items()) if self.deploy else "as in the graph")
        ternary_acc = self.ternary_accumulator_bits or self.accumulator_bits
        parts = [
            f"deploy={deploy}", f"int accumulator {self.accumulator_bits} bit", f"ternary accumulator {ternary_acc} bit",
            f"skip zero weights {'on' if self.skip_zero_weights else 'off'}",
            f"bias adds {'on' if self.include_bias else 'off'}",
            f"requant {self.requant_format + ' mul' if self.include_requant else 'off'}",
            f"elementwise energy {'on' if self.include_elementwise else 'off'}",
            f"memory {self.memory_level if self.include_memory else 'off'}",
            f"ternary packing {self.ternary_packing}", f"scales {self.metadata_bits} bit",
        ]
        return "; ".join(parts)


def merge_conventions(conventions: Conventions | Mapping[str, Any] | None, options: Mapping[str, Any]) -> Conventions:
    """``conventions`` (a Conventions, a dict of its fields or None for the defaults) with single
    fields replaced by ``options``, e.g. ``{"deploy": "fp16"}``."""
    if conventions is None:
        base: dict[str, Any] = {}
    elif isinstance(conventions, Conventions):
        base = {k: v for k, v in conventions.to_dict().items() if k not in ("name", "version")}
    elif isinstance(conventions, Mapping):
        base = dict(conventions)
    else:
        raise TypeError(f"conventions: expected a Conventions, a dict or None, got {type(conventions).__name__}")
    base.update(options)
    return Conventions(**Conventions._check_keys(base))
