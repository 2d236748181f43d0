"""HASTE and HTTM ops are inference-only: a backward through them says so, and only when it runs.

Hash buckets and token merges have no useful gradient, and the fast kernels are not written for
autograd. Without an autograd formula, torch raises "no autograd formula was registered" — and
AOTAutograd raises it while *compiling* any graph whose inputs require grad, so
``torch.compile(model, backend="fxslim")`` failed on a model called without ``torch.no_grad()``,
even for pure inference. Each op gets a backward made of ``fxslim::no_gradient`` calls: their fake
kernel gives the gradient's shape, so tracing and compiling succeed, and their real kernel raises
an error that names the op and what to do, when a gradient is actually asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["no_gradient", "register_inference_only"]


def _message(op: str) -> str:
    return (
        f"{op} has no gradient: fxslim's HASTE and HTTM ops are inference-only (hash buckets and token "
        "merges are not differentiable). Train or fine-tune the original model, then rewrite it; run the "
        "rewritten model under torch.no_grad() or torch.inference_mode()."
    )


@torch.library.custom_op("fxslim::no_gradient", mutates_args=())
def no_gradient(grad: Tensor, shape: Sequence[int], dtype: torch.dtype, op: str) -> Tensor:
    """Raises: the gradient of ``op``'s input of this shape does not exist."""
    raise RuntimeError(_message(op))


@no_gradient.register_fake
def _(grad, shape, dtype, op):
    return grad.new_empty(shape, dtype=dtype)


def register_inference_only(op: str, tensor_args: Sequence[int]) -> None:
    """Give custom op ``op`` (e.g. "fxslim::haste_conv2d") a backward that raises when it runs;
    ``tensor_args``: positions of its tensor inputs."""

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.metas = [(tuple(inputs[i].shape), inputs[i].dtype) if isinstance(inputs[i], Tensor) else None
                     for i in range(len(inputs))]

    def backward(ctx: Any, grad: Tensor) -> tuple:
        grads: list[Tensor | None] = [None] * len(ctx.metas)
        for i in tensor_args:
            if ctx.needs_input_grad[i] and ctx.metas[i] is not None:
                shape, dtype = ctx.metas[i]
                grads[i] = torch.ops.fxslim.no_gradient(grad, list(shape), dtype, op)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
