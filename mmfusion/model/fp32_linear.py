"""A linear map computed in float32 under autocast, as an operator of its own.

The output heads run in float32 while the rest of a bf16 model runs under autocast (Switti). Written
as a region with autocast turned off, that region enters a compiled training step's graph, and
AOTAutograd then keeps the graph out of its cache: every run traced the whole forward and backward
again (about 20 s on 2 CPU cores). As an operator, with its backward an operator too, the graph holds
no autocast region and is cached like any other.
"""

# no `from __future__ import annotations`: torch.library reads the signatures' types

import torch
import torch.nn.functional as F


@torch.library.custom_op("mmfusion::linear_fp32", mutates_args=())
def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b in float32, whatever autocast would choose; float32 out."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


@linear_fp32.register_fake
def _linear_fp32_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mmfusion::linear_fp32_backward", mutates_args=())
def linear_fp32_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `linear_fp32` for x, the weight and the bias (zeros (0,) without one), in float32
    and then in each input's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        g = grad.float().reshape(-1, grad.shape[-1])
        gx = (g @ weight.float()).reshape(x.shape).to(x.dtype)
        gw = (g.t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
        gb = g.sum(0) if with_bias else g.new_zeros(0)
    return gx, gw, gb


@linear_fp32_backward.register_fake
def _linear_fp32_backward_shape(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gb = grad.new_empty((weight.shape[0],) if with_bias else (0,), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(weight), gb


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    x, weight = ctx.saved_tensors
    gx, gw, gb = linear_fp32_backward(grad, x, weight, ctx.bias_dtype is not None)
    return gx, gw, None if ctx.bias_dtype is None else gb.to(ctx.bias_dtype)


linear_fp32.register_autograd(_backward, setup_context=_setup)
