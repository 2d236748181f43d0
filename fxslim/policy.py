"""Which nodes a pass touches, and with which config: the user's policy, resolved in one place.

Precedence (highest first): an override for the module name (exact, then glob patterns such as
``"layer4.*"`` in the order given) > an override for the op kind (``"kind:pointwise_conv"``) >
the pass's own config. An override of ``None`` skips the node (reason ``"filtered_out"``);
``filter_fn(node, fqn) -> bool`` returning False also skips it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from fxslim.config import Config

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """``filter_fn`` and per-module/per-kind overrides; values are configs of the same pass or None."""

    filter_fn: Callable[[fx.Node, str], bool] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    matched: set[str] = field(default_factory=set, compare=False, repr=False)  # override keys that applied

    def __post_init__(self) -> None:
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn: expected a callable (node, fqn) -> bool, got {type(self.filter_fn).__name__}")
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"overrides: expected a mapping of module name -> config or None, got {type(self.overrides).__name__}")
        for key, value in self.overrides.items():  # strings are parsed before (``passes.base.parse_overrides``)
            if value is not None and not isinstance(value, Config):
                raise ValueError(f"overrides[{key!r}]: expected a pass config (e.g. fxslim.HASTE(L=4) or 'haste:L=4') "
                                 f"or None to skip the module, got {type(value).__name__}")
        object.__setattr__(self, "overrides", dict(self.overrides))

    def unmatched(self) -> list[str]:
        """Override keys that named no module or kind any pass considered (a typo, most likely)."""
        return [key for key in self.overrides if key not in self.matched]

    def resolve(self, cfg: Any, node: fx.Node, fqn: str, kind: str) -> tuple[Any, str]:
        """(config to use, "") or (None, reason) for one node."""
        if self.filter_fn is not None and not self.filter_fn(node, fqn):
            return None, "filtered_out"
        for key in self._module_keys(fqn):
            found, value = self._override(cfg, key)
            if found:
                return (value, "") if value is not None else (None, "filtered_out")
        found, value = self._override(cfg, f"kind:{kind}")
        if found:
            return (value, "") if value is not None else (None, "filtered_out")
        return cfg, ""

    def _module_keys(self, fqn: str) -> list[str]:
        keys = [k for k in self.overrides if not k.startswith("kind:")]
        exact = [k for k in keys if k == fqn]
        globbed = [k for k in keys if k != fqn and any(c in k for c in "*?[") and fnmatch.fnmatchcase(fqn, k)]
        return exact + globbed

    def _override(self, cfg: Any, key: str) -> tuple[bool, Any]:
        """An override applies to a pass when it is None or a config of the same class."""
        if key not in self.overrides:
            return False, None
        value = self.overrides[key]
        self.matched.add(key)
        if value is None or type(value) is type(cfg):
            return True, value
        return False, None
