"""`linear_fp32`: the output heads' float32 product under autocast, as an operator."""

import pytest
import torch
import torch.nn.functional as F

from mmfusion.model.fp32_linear import linear_fp32


@pytest.mark.parametrize("bias", [True, False])
def test_linear_fp32_is_the_float32_product_and_its_gradients_under_bf16_autocast(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_fp32(x, w, b)
        bf16 = F.linear(x, w, b)
    want = F.linear(x.float(), w, b)
    assert out.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert (bf16.float() - want).abs().max() > 1e-3  # autocast alone would have rounded it
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, [x, w] + ([b] if bias else []), g)
    ref = torch.autograd.grad(want, [x, w] + ([b] if bias else []), g)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.mmfusion.linear_fp32.default, (x.detach(), w.detach(), b))
