"""The test setup's interpreter converts fp32 to bf16 by rounding to nearest even, as the GPU does (conftest)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _round_kernel(x_ptr, stored_ptr, cast_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(x_ptr + offs)
    tl.store(stored_ptr + offs, v)  # fp32 values into a bf16 pointer
    tl.store(cast_ptr + offs, v.to(tl.bfloat16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter (CPU runs)")
def test_fp32_to_bf16_rounds_to_nearest_even():
    """Values just above, at and below half a bf16 step, both signs, ties to even, and a random batch: the kernel's
    stores and casts equal torch's conversion (round to nearest even) bit for bit."""
    step = 2.0 ** -7  # bf16 spacing in [1, 2)
    special = [1 + step / 2 + 2 ** -12, 1 + step / 2, 1 + 3 * step / 2, 1 + step / 2 - 2 ** -12, 1.0, -1 - step / 2
               - 2 ** -12, 3.0e38, 1.0e-40, 0.0, -0.0]
    x = torch.cat([torch.tensor(special, dtype=torch.float32), torch.randn(1014) * 100]).contiguous()
    stored = torch.empty(1024, dtype=torch.bfloat16)
    cast = torch.empty(1024, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, stored, cast, N=1024)
    expected = x.to(torch.bfloat16)
    assert torch.equal(stored.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(cast.view(torch.int16), expected.view(torch.int16))
