"""The W-stream GEMM (kernels/wstream.py) alone, through Triton's interpreter: y (+)= x·Wᵀ against float64."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_fast.kernels.wstream import wstream_config, wstream_launch  # noqa: E402
from tests.utils import assert_close  # noqa: E402


@pytest.mark.parametrize("T,K,N", [(1, 40, 24), (29, 48, 40), (16, 64, 16), (3, 17, 5), (40, 96, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_wstream_matches_reference(T, K, N, dtype, accumulate):
    """Odd T, K, N (masked rows, columns and K tails), several row tiles, with y as C or the bias added instead; y
    starts as NaN when it is only written, so an element left unwritten shows."""
    x = torch.randn(T, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    c = torch.randn(T, N, dtype=dtype)
    y = c.clone() if accumulate else torch.full((T, N), float("nan"), dtype=dtype)
    cfg = wstream_config(T, dtype, is_cuda=False)
    b = torch.randn(N, dtype=dtype)
    wstream_launch(x, w, y, cfg, "ieee", accumulate=accumulate, has_bias=True)(x, w, b, y)
    ref = x.double() @ w.double().t() + (c.double() if accumulate else b.double())
    assert_close(f"wstream T={T} K={K} N={N}", y, ref, dtype)


def test_wstream_strided_operands_and_tiles():
    """Transposed views of x and W (non-unit inner strides), a non-contiguous y, and tiles from the config keys:
    the kernel addresses everything through strides."""
    T, K, N = 21, 40, 36
    x = torch.randn(K, T).t()
    w = (torch.randn(K, N) / K ** 0.5).t()
    base = torch.randn(T, 2 * N)
    others = base[:, 1::2].clone()
    y = base[:, ::2]
    c = y.clone()
    cfg = dict(BLOCK_T=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    wstream_launch(x, w, y, cfg, "ieee")(x, w, x, y)
    assert_close("wstream strided", y, x.double() @ w.double().t() + c.double(), torch.float32)
    assert torch.equal(base[:, 1::2], others)  # the columns between y's are not written


def test_wstream_config_tiles():
    """One row tile up to 64 rows (W read once), 64-row tiles beyond; fp32 halves the K step."""
    assert wstream_config(1, torch.bfloat16, True)["BLOCK_T"] == 16
    assert wstream_config(33, torch.bfloat16, True)["BLOCK_T"] == 64
    assert wstream_config(200, torch.bfloat16, True)["BLOCK_T"] == 64
    assert wstream_config(64, torch.float32, True)["BLOCK_K"] == 64


def test_wstream_fits_shared_memory(monkeypatch):
    """The 64-row bf16 pipeline (144 KiB) fits Hopper's 228 KiB per SM, not a 100 KiB one; the multi-LoRA default
    then keeps cuBLAS (kernels/multi_lora.py)."""
    from lora_fast.kernels import config, wstream

    cfg = wstream_config(64, torch.bfloat16, is_cuda=True)
    monkeypatch.setattr(config, "shared_memory_per_sm", lambda device: 233472)
    assert wstream.wstream_fits(cfg, torch.bfloat16, "cuda:0")
    monkeypatch.setattr(config, "shared_memory_per_sm", lambda device: 102400)
    assert not wstream.wstream_fits(cfg, torch.bfloat16, "cuda:0")
    assert wstream.wstream_fits(dict(cfg, num_stages=2), torch.bfloat16, "cuda:0")
    monkeypatch.setattr(config, "shared_memory_per_sm", lambda device: 0)  # not reported: never assumed to fit
    assert not wstream.wstream_fits(cfg, torch.bfloat16, "cuda:0")


@pytest.mark.parametrize("programs", [1, 3])
def test_wstream_persistent_walk(programs):
    """With fewer programs than tiles (config `programs`) each program walks tiles pid, pid + programs, ...: every
    tile is written once (y starts as NaN), including a last program with fewer tiles than the others."""
    T, K, N = 29, 48, 72
    x = torch.randn(T, K)
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N)
    y = torch.full((T, N), float("nan"))
    cfg = dict(wstream_config(T, torch.float32, is_cuda=False), programs=programs)
    launch = wstream_launch(x, w, y, cfg, "ieee", accumulate=False, has_bias=True)
    assert launch.grid[0] == programs  # 2 row tiles x 5 N tiles = 10 tiles, walked by `programs` programs
    launch(x, w, b, y)
    assert_close(f"persistent walk, {programs} programs", y, x.double() @ w.double().t() + b.double(), torch.float32)
