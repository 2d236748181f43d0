"""One version counter for all of an integer model's tensors, so that one read says whether any was written.

A lowered PROM model (``micro_batched``) packs the weights once and must notice when the model's
tensors are written in place afterwards (``weight.add_(...)``, ``load_state_dict``). Reading the
version of each of MobileNetV2's 159 tensors before every call took 50-90 µs of its 2.3 ms at batch
1: caches are cold after a model run, and each read touches three objects per tensor.

``share_version_counter`` makes every tensor of a converted model an alias of one empty anchor:
``anchor.view(dtype)`` shares the anchor's version counter (as every view does), and ``set_`` then
points the alias at a storage of its own holding the tensor's values (``set_`` is an in-place op:
the counter stays). An in-place write to any of them then moves ``anchor._version``. Each tensor
keeps its own complete storage, so ``torch.save``, ``torch.export.save``, copies and fake tensors
see ordinary tensors (views of one shared storage would be refused by ``torch.save`` across dtypes
and warned about by ``torch.export.save``).

``watched`` gives the tensors whose versions cover a module's tensors: the anchor of each alias it
holds, every other tensor by itself (one assigned since, a model moved with ``.to()``, a module never
converted); ``stamp`` records their versions and ``written`` says whether one has moved since: what
``micro_batched`` and the ``torch.compile`` backend read before every call. Which anchor an alias
shares is recorded outside the tensors (weakly, per tensor), so a copy or a pickle never carries a
claim about a counter it does not share: a copy of an integer model shares a counter of its own
again (``IntegerModel.__deepcopy__``, ``_unpickled``).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

__all__ = ["share_version_counter", "watched", "covering", "stamp", "written"]

# id(alias) -> (a weak reference to the alias, its anchor); an entry leaves with its alias. Keyed by
# id: tensors compare elementwise, so they cannot be the keys of a WeakKeyDictionary.
_ANCHOR: dict[int, tuple[weakref.ref, Tensor]] = {}


def _shareable(t: object) -> bool:
    return isinstance(t, Tensor) and t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized


def share_version_counter(model: nn.Module) -> None:
    """Replace every CPU tensor of ``model`` (parameters and buffers, in all its submodules) by a copy
    on one version counter (module docstring); a tensor held under two names stays one tensor.
    ``model`` must own its tensors: a reference kept from before would no longer be the model's."""
    places: dict[int, tuple[Tensor, list[tuple[dict, str]]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if _shareable(t):
                    places.setdefault(id(t), (t, []))[1].append((table, name))
    anchor = torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        for t, names in places.values():
            values = t.detach().clone()
            alias = anchor.view(t.dtype)
            alias.set_(values.untyped_storage(), values.storage_offset(), values.shape, values.stride())
            if isinstance(t, nn.Parameter):
                alias = nn.Parameter(alias, requires_grad=t.requires_grad)  # an alias of the alias: the same counter
            for table, name in names:
                table[name] = alias
            _ANCHOR[id(alias)] = (weakref.ref(alias), anchor)
            weakref.finalize(alias, _ANCHOR.pop, id(alias), None)


def watched(module: nn.Module) -> list[Tensor]:
    """Tensors whose versions move whenever a parameter or buffer of ``module`` is written in place:
    the anchor of each alias it holds (once), every other tensor itself."""
    return covering([*module.buffers(), *module.parameters()])


def covering(tensors: list[Tensor]) -> list[Tensor]:
    """Tensors whose versions move whenever one of ``tensors`` is written in place: each alias's
    anchor (once), every other tensor itself."""
    found: dict[int, Tensor] = {}
    for t in tensors:
        ref, anchor = _ANCHOR.get(id(t), (None, t))
        anchor = anchor if ref is not None and ref() is t else t
        found.setdefault(id(anchor), anchor)
    return list(found.values())


def stamp(tensors: list[Tensor]) -> tuple[tuple[Tensor, int | None], ...]:
    """(tensor, its version) of each of ``tensors`` (``watched`` or ``covering`` ones), for ``written``;
    None for an inference tensor, which has no version counter (loaded or made in inference mode)."""
    return tuple((t, None if t.is_inference() else t._version) for t in tensors)


def written(recorded: tuple[tuple[Tensor, int | None], ...]) -> bool:
    """Whether a tensor of a ``stamp`` was written in place since it was taken (always, for an
    inference tensor: nothing tells)."""
    return any(version is None or t._version != version for t, version in recorded)
