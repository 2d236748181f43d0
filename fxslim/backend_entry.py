"""Which ``torch.compile`` call a graph the backend gets belongs to, and where in the model it starts.

Dynamo hands the backend one graph at a time: the model's forward up to a graph break, the code
after it (a resume function), or a submodule's forward it runs on its own after a break inside
it. ``fxslim.optimize`` sees the whole model; to rewrite those graphs as it would, the backend
needs what a graph does not say, and reads it off the Python stack, where dynamo's entry frame
(``compile_wrapper``) holds the call's arguments and the frames between it and the graph's
caller say whose code runs:

- the shapes of the tensors the compiled model was called with (the image, for HASTE's stem);
- whether the graph starts at them, or reads another part's outputs;
- the module the call was made on, and where the module whose code is compiled sits in it, so
  that a block's layers keep their path ("body.conv", not "conv").

Private layouts of torch: where they are not found, nothing is known (None, ""), as before.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["Entry", "compile_entry", "frame_prefix", "reads_image"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_MODULES_DIR = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep
_MODULE_CALL = os.path.join(_MODULES_DIR, "module.py")  # nn.Module.__call__: glue, not a model's code
_ENTRY = (os.path.join(_TORCH_DIR, "_dynamo", "eval_frame.py"), "compile_wrapper")
_BACKEND_FILES = {os.path.join(os.path.dirname(__file__), name) for name in ("backend.py", "backend_entry.py")}


@dataclass(frozen=True)
class Entry:
    """The ``torch.compile`` call a graph belongs to: the shapes of the tensors it was called with,
    whether the graph starts at them, the module the call was made on (None for a function that is
    not a module's method) and what it compiled (the module or the function, for ``reads_image``)."""

    input_shapes: tuple[tuple[Any, ...], ...]
    at_input: bool
    root: torch.nn.Module | None
    compiled: Any


def compile_entry() -> Entry | None:
    """The ``torch.compile`` call being served. The graph starts at the call's arguments when
    nothing but ``nn.Module.__call__`` runs between dynamo's entry and the frame it compiles; a
    frame of the model's own code in between (the forward that called a submodule dynamo compiles
    on its own, the code before a graph break) means its inputs are another part's outputs."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _BACKEND_FILES:
        frame = frame.f_back
    inside_model, root = False, None
    while frame is not None:
        path = frame.f_code.co_filename
        if (path, frame.f_code.co_name) == _ENTRY:
            args = (frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}))
            shapes = tuple(tuple(t.shape) for t in tree_leaves(args) if isinstance(t, torch.Tensor))
            fn = frame.f_locals.get("fn")
            owner = getattr(fn, "__self__", None)  # torch.compile(model.forward): the bound method's model
            if root is None and isinstance(owner, torch.nn.Module):
                root = owner
            return Entry(shapes, not inside_model, root, root if root is not None else fn)
        if path == _MODULE_CALL and frame.f_code.co_name == "_call_impl":
            root = frame.f_locals.get("self")  # called straight from the entry, so far: the model
        elif not path.startswith(_TORCH_DIR) or (path.startswith(_MODULES_DIR) and path != _MODULE_CALL):
            inside_model, root = True, None  # user code, or a torch module's forward (Sequential's)
        frame = frame.f_back
    return None


# per compiled model or function: the first graph that held a conv, by where its code starts and
# the channels of its tensor inputs
_FIRST_CONV: weakref.WeakKeyDictionary[Any, tuple] = weakref.WeakKeyDictionary()


def reads_image(entry: Entry | None, code: CodeType | None, channels: tuple[int, ...], has_conv: bool) -> bool:
    """Whether any tensor input of the graph being compiled may be the image (as for a graph of the
    whole forward), rather than only inputs shaped like the call's. It may in a graph at the call's
    inputs, and in one compiled before any graph with a conv of this model or function
    (preprocessing that reshapes the image, a graph break, then the stem), or that is that graph
    again (a recompile at another size, or after ``torch._dynamo.reset()``, which makes new code
    objects: it is known by where its code starts and by its inputs' ``channels``, so that the same
    block class further on is not). ``has_conv``: the graph holds a conv."""
    if entry is None:
        return True
    key = None if code is None else (code.co_filename, code.co_firstlineno, code.co_name, channels)
    try:
        first = _FIRST_CONV.get(entry.compiled)
        if first is None and has_conv and key is not None:
            _FIRST_CONV[entry.compiled] = first = key
    except TypeError:  # not weakly referable: the first graph with a conv is not known
        first = key
    return entry.at_input or first is None or first == key


def frame_prefix(entry: Entry | None, owner: Any, module_keys: list[str], filter_fn: bool) -> tuple[str, str]:
    """(where ``owner``, the module whose forward dynamo compiles, sits in the model: "" at the root
    or when unknown; a warning to give, or ""). A graph of a submodule's forward compiled on its own
    after a graph break inside it names its layers from that submodule ("conv1" for
    "layer1.0.conv1"). Dynamo runs that graph for every module of the same class, so a prefix is
    given only when the model holds one; otherwise, when the policy may name those layers (a
    ``filter_fn``, an override key under one of those modules, or a pattern), the warning says so."""
    root = entry.root if entry is not None else None
    if not isinstance(owner, torch.nn.Module) or not isinstance(root, torch.nn.Module) or owner is root:
        return "", ""
    cls = type(owner).__name__
    same_class = [(name, m) for name, m in root.named_modules() if type(m) is type(owner)]
    places = [name for name, _ in same_class]
    mine = next((name for name, m in same_class if m is owner), None)
    if mine is not None and len(places) == 1:
        return mine, ""
    patterns = [k for k in module_keys if any(c in k for c in "*?[")]
    under = [k for k in module_keys if any(k == p or k.startswith(p + ".") for p in places)]
    if not (filter_fn or patterns or under or (mine is None and module_keys)):
        return "", ""
    if mine is None:
        return "", (f"a graph break inside {cls}.forward, a module {type(root).__name__} does not hold as a "
                    f"submodule (in a plain list?): the layers in that graph are named from the {cls} itself "
                    "(e.g. 'conv1'), so overrides or filter_fn naming them by their path in the model do not "
                    "reach them; register it (nn.ModuleList) or remove the graph break")
    shown = ", ".join(places[:3]) + (", ..." if len(places) > 3 else "")
    return "", (f"a graph break inside {cls}.forward: dynamo compiles its code once for the {len(places)} {cls} "
                f"modules ({shown}), so the layers in that graph are named from the block (e.g. 'conv1'), and "
                "overrides or filter_fn naming one block's layers do not reach them; remove the graph break or "
                "use fxslim.optimize")

