"""The pass contract: match (read-only) -> rewrite (one candidate at a time) -> report.

A pass is a frozen ``Config`` dataclass (its fields are its configuration) with ``match`` and
``rewrite``. ``Pass.__call__`` collects every candidate first, then rewrites them, then cleans the
graph (dead code, lint, recompile) and checks the invariants in ``ensures``. Every candidate ends
in the report: rewritten, or skipped with a short stable reason string. Passes register a name
with ``register_pass`` so the CLI and the torch.compile backend can build them from strings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from fxslim.config import Config
from fxslim.ir import IR, META_PASS, ParamRef, meta_val
from fxslim.inplace import make_inplace_explicit, remove_dead_code, unused_calls
from fxslim.policy import Policy

__all__ = [
    "Candidate", "Entry", "PassReport", "PassResult", "PassContext", "Pass", "PassError",
    "register_pass", "registered_passes", "parse_pass", "run_passes",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One place a pass will rewrite: its anchor node, canonical view and resolved config."""

    anchor: fx.Node
    view: Any
    fqn: str
    kind: str
    config: "Pass"
    nodes: tuple[fx.Node, ...] = ()


@dataclass(frozen=True)
class Entry:
    """A report line: a candidate that was rewritten, or skipped with a stable reason.

    ``reason``: the stable code a program can branch on ("local_attention"); ``detail``: one
    sentence for a person (what stopped it, what to pass); ``info``: the values the pass chose or
    measured (kept tokens, buckets), for tables and JSON.
    """

    node: str
    fqn: str
    kind: str
    status: Literal["rewritten", "skipped"]
    reason: str = ""
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassReport:
    """What one pass did on one graph."""

    pass_name: str
    graph: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(e.status == "rewritten" for e in self.entries)

    @property
    def skipped(self) -> Counter:
        return Counter(e.reason for e in self.entries if e.status == "skipped")

    def skip(self, node: fx.Node | str, fqn: str, kind: str, reason: str, detail: str = "") -> None:
        name = node.name if isinstance(node, fx.Node) else node
        self.entries.append(Entry(name, fqn, kind, "skipped", reason, detail))


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    report: PassReport


@dataclass
class PassContext:
    """What a pass knows besides the graph: the model's batch size and the shapes of its tensor
    inputs (``optimize``'s example; a graph traced apart does not see them), how many views a list
    input holds (``[{"img": ...}, ...]``: 0 without one), real values of placeholder weights (dynamo
    graphs), the user's policy, and where the graph sits in the model: ``path``, the module a graph
    traced apart runs, and ``at_input``, False for a graph whose inputs are another part's outputs
    (one dynamo compiles after a graph break, or for a submodule's forward it runs on its own)."""

    ir: IR
    batch_size: Any = None
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_views: int = 0
    placeholder_values: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    path: str = ""
    at_input: bool = True

    def tensor(self, gm: fx.GraphModule, ref: ParamRef | None) -> torch.Tensor | None:
        """The real tensor behind a weight reference (None for a missing optional weight)."""
        if ref is None:
            return None
        value = ref.tensor(gm, self.placeholder_values)
        if value is None and ref.node is not None and ref.node.op == "placeholder":
            raise ValueError(
                f"weight placeholder {ref.node.name!r} has no real value: pass the backend's example_inputs"
            )
        return value


class PassError(RuntimeError):
    """A pass failed; the message names it, the graph and the passes that ran before it."""


@dataclass(frozen=True)
class Pass(Config):
    """Base class of all passes; subclasses are frozen dataclasses registered with ``register_pass``."""

    kinds: ClassVar[tuple[str, ...]] = ()

    def match(self, gm: fx.GraphModule, ctx: PassContext, report: PassReport) -> list[Candidate]:
        """Candidates in ``gm``; skipped ones go into ``report`` with a reason. Must not mutate ``gm``."""
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, cand: Candidate, ctx: PassContext) -> dict[str, Any]:
        """Rewrite exactly one candidate; returns extra info for its report entry."""
        raise NotImplementedError

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Preconditions (raise ValueError when the graph cannot be handled)."""

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, new_nodes: Sequence[fx.Node]) -> None:
        """Graph invariants after rewriting (docs/INVARIANTS.md)."""
        gm.graph.lint()
        missing = [n.name for n in new_nodes if n.graph is gm.graph and n.op != "get_attr" and meta_val(n) is None]
        assert not missing, f"{self.name}: new nodes without meta['val']: {missing}"

    def resolve(self, ctx: PassContext, node: fx.Node, fqn: str, kind: str, report: PassReport) -> "Pass | None":
        """This pass's config for one node after the user's policy; records 'filtered_out' skips."""
        cfg, reason = ctx.policy.resolve(self, node, fqn, kind)
        if cfg is None:
            report.skip(node, fqn, kind, reason)
        return cfg  # type: ignore[return-value]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.requires(gm, ctx)
        if make_inplace_explicit(gm):
            gm.recompile()
        report = PassReport(self.name, ctx.path)
        candidates = self.match(gm, ctx, report)
        before, effects = set(gm.graph.nodes), unused_calls(gm)
        for cand in candidates:
            info = self.rewrite(gm, cand, ctx) or {}
            report.entries.append(Entry(cand.anchor.name, cand.fqn, cand.kind, "rewritten", info=info))
        if candidates:
            remove_dead_code(gm, keep=effects)
            gm.recompile()
        new_nodes = [n for n in gm.graph.nodes if n not in before]
        for node in new_nodes:
            node.meta.setdefault(META_PASS, self.name)
        self.ensures(gm, ctx, new_nodes)
        return PassResult(gm, bool(candidates), report)


_PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a pass buildable from ``"name:key=value,..."``; duplicates raise."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in _PASSES:
            raise ValueError(f"register_pass: a pass named {name!r} is already registered ({_PASSES[name].__name__})")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_PASSES)


def pass_list(passes: Any) -> list:
    """``passes`` as a list: one pass (object or string) or an iterable of them; ValueError otherwise."""
    if isinstance(passes, (str, Pass)) or (isinstance(passes, type) and issubclass(passes, Pass)):
        return [passes]  # a class: ``parse_pass`` says to pass an instance
    if isinstance(passes, (dict, Mapping)) or not isinstance(passes, Iterable):
        raise ValueError(f"passes: expected a pass, a string like 'haste:L=14', or a list of them; got "
                         f"{type(passes).__name__}")
    return list(passes)


def parse_overrides(overrides: Any) -> Any:
    """``overrides`` with its string values parsed as ``passes=`` strings are ("haste:L=4"); anything
    but a mapping is returned as it is, for ``Policy`` to refuse."""
    if not isinstance(overrides, Mapping):
        return overrides
    return {key: parse_pass(value) if isinstance(value, str) else value for key, value in overrides.items()}


def parse_pass(spec: "str | Pass") -> Pass:
    """A Pass from an instance (returned as is) or a string such as ``"haste:L=14"``."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        raise ValueError(f"passes: got the class {spec.__name__}; pass an instance, e.g. {spec.__name__}(), "
                         f"or a string like {spec.name!r}")
    if not isinstance(spec, str):
        raise TypeError(f"passes: expected Pass objects or strings like 'haste:L=14', got {type(spec).__name__}")
    name = spec.partition(":")[0].strip().lower()
    if name not in _PASSES:
        raise ValueError(f"passes: unknown pass {name!r}; known passes: {', '.join(sorted(_PASSES)) or '(none)'}")
    return _PASSES[name].from_string(spec)


def run_passes(gm: fx.GraphModule, passes: Iterable[Pass], ctx: PassContext) -> list[PassResult]:
    """Run passes in order; a failure is re-raised naming the pass, the graph and the passes before it."""
    results: list[PassResult] = []
    done: list[str] = []
    for p in passes:
        try:
            results.append(p(gm, ctx))
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise PassError(
                f"pass {p.name!r} failed on graph {ctx.path or '<root>'!r} after passes {done}: {exc}"
            ) from exc
        done.append(p.name)
    return results


# ----------------------------------------------------------------------------------------------
# Helpers for rewrites


def replace_fields(cfg: Pass, **changes: Any) -> Pass:
    """A copy of a pass config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)
