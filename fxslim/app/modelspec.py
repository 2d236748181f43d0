"""Model and input specs used by the CLI: ``torchvision:mobilenet_v2``, ``timm:vit_tiny_patch16_224``,
``fxslim:vggt_small``, ``path/to/file.py:factory``; inputs like ``1x3x224x224``.

Nothing is downloaded: torchvision and timm models get random weights; fxslim's own models are
built here, the MNIST ones with the small checkpoints shipped in ``fxslim/models/checkpoints``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_model", "parse_input", "make_inputs", "FXSLIM_MODELS"]

# fxslim's own reference models: name -> "module:factory" (imported only when asked for).
FXSLIM_MODELS: dict[str, str] = {
    "vggt_1b": "fxslim.models.vggt:vggt_1b",  # input 1xSx3xHxW (S frames)
    "vggt_small": "fxslim.models.vggt:vggt_small",
    "vggt_tiny": "fxslim.models.vggt:vggt_tiny",
    "mobilenet_mnist": "fxslim.models.mobilenet_mnist:load_mobilenet_mnist",  # trained, input Nx1x28x28
    "resnet18_mnist_small": "fxslim.models.resnet_cifar:pretrained_mnist_resnet18_small",  # trained, Nx1x32x32
    "resnet18_cifar": "fxslim.models.resnet_cifar:resnet18",  # random weights, Nx3x32x32
    "resnet34_cifar": "fxslim.models.resnet_cifar:resnet34",
}


def load_model(spec: str) -> nn.Module:
    """An ``nn.Module`` in eval mode from a spec (see the module docstring). Random weights are drawn
    from a fixed seed (torch's global generator is left as it was), so a command gives the same
    numbers every time, also for a model whose path depends on its values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _built(spec)


def _built(spec: str) -> nn.Module:
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(
            f"MODEL: expected 'torchvision:NAME', 'timm:NAME', 'fxslim:NAME' or 'path/to/file.py:factory', got {spec!r}"
        )
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if name not in known:
            raise ValueError(f"MODEL: unknown torchvision model {name!r}{_did_you_mean(name, known)}")
        # segmentation and detection builders load an ImageNet backbone unless told not to
        backbone = "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters
        model = torchvision.models.get_model(name, weights=None, **({"weights_backbone": None} if backbone else {}))
    elif source == "timm":
        timm = _optional("timm", spec)
        if not timm.is_model(name):
            raise ValueError(f"MODEL: unknown timm model {name!r}{_did_you_mean(name, timm.list_models())}")
        model = timm.create_model(name, pretrained=False)
    elif source == "fxslim":
        if name not in FXSLIM_MODELS:
            raise ValueError(f"MODEL: unknown fxslim model {name!r}; known: {', '.join(sorted(FXSLIM_MODELS))}")
        module, _, factory = FXSLIM_MODELS[name].partition(":")
        model = getattr(importlib.import_module(module), factory)()
    elif source.endswith(".py"):
        model = _from_file(Path(source), name)
    else:
        raise ValueError(f"MODEL: unknown source {source!r}; expected torchvision, timm, fxslim or a .py file")
    if not isinstance(model, nn.Module):
        raise TypeError(f"MODEL: {spec!r} did not build an nn.Module (got {type(model).__name__})")
    return model.eval()


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else f" ({len(known)} known; none close)"


def _optional(package: str, spec: str) -> Any:
    """An optional dependency, or a ValueError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError:
        raise ValueError(f"MODEL: {spec!r} needs {package}, which is not installed: pip install {package}") from None


def _from_file(path: Path, factory: str) -> nn.Module:
    """``factory()`` (or the module instance of that name) from the file, which imports the modules
    next to it as when run as a script."""
    if not path.is_file():
        raise ValueError(f"MODEL: file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        _no_exit(spec.loader.exec_module, module, what=f"{str(path)!r} when imported")
    finally:
        sys.path.remove(folder)
    if not hasattr(module, factory):
        raise ValueError(f"MODEL: {str(path)!r} has no attribute {factory!r}")
    built = getattr(module, factory)
    if isinstance(built, nn.Module):
        return built
    if not callable(built):
        raise ValueError(f"MODEL: {factory!r} in {str(path)!r} is a {type(built).__name__}; expected an nn.Module "
                         "or a function that returns one")
    try:
        inspect.signature(built).bind()
    except TypeError:
        raise ValueError(f"MODEL: {factory}() in {str(path)!r} needs arguments; name a function that takes none "
                         f"(def make(): return {factory}(...))") from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    return _no_exit(built, what=f"{factory}() in {str(path)!r}")


def _no_exit(fn: Any, *args: Any, what: str) -> Any:
    """``fn(*args)``; a ``sys.exit()`` in the user's file ends in a ValueError that says so (it
    ended the command with its own exit code and no message)."""
    try:
        return fn(*args)
    except SystemExit as exc:
        raise ValueError(f"MODEL: {what} called sys.exit({exc.code!r}); guard script code with "
                         "`if __name__ == '__main__':`") from None


def parse_input(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input: expected sizes joined by 'x' such as 1x3x224x224, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--input: expected sizes >= 1 such as 1x3x224x224, got {text!r}")
    return shape


def make_inputs(shapes: list[str], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random example inputs (fixed seed) of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(parse_input(s), generator=generator) for s in shapes)
