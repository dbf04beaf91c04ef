"""The kernels' dropout mask reproduced in numpy: Philox-4x32-10 exactly as Triton's `tl.randint4x`, each 32-bit
word split into two 16-bit halves compared with ceil(p * 2**16) (kernels.helpers.dropout_keep).

Used by the plain-PyTorch path (CPU tensors without the interpreter) so that both paths drop the same
elements for the same seed, and by the tests as an independent check of the in-kernel mask.
"""
import math

import numpy as np
import torch

_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, seed: int, rounds: int = 10):
    """Four uint32 words (as uint64 arrays) of Philox-4x32 for 64-bit `counter` values and a 64-bit `seed`."""
    counter = counter.astype(np.uint64)
    c0, c1 = counter & _LOW32, counter >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(rounds):
        prod_b = _ROUND_B * c2  # < 2**64: exact in uint64
        prod_a = _ROUND_A * c0
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & _LOW32, prod_a & _LOW32
        k0 = (k0 + _KEY_A) & _LOW32
        k1 = (k1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """A 16-bit half keeps its element iff it is >= this: ceil(p * 2**16), at most 2**16 (nothing kept)."""
    return min(math.ceil(p * 2**16), 2**16)


def dropout_mask_numpy(seed: int, M: int, K: int, p: float) -> np.ndarray:
    """Bool keep-mask [M, K]: element (m, k) takes the low (k even) or high (k odd) 16 bits of word (k % 8) // 2
    of Philox at counter m * ceil(K/8) + k // 8."""
    k8 = -(-K // 8)
    counter = np.arange(M, dtype=np.uint64)[:, None] * np.uint64(k8) + np.arange(k8, dtype=np.uint64)[None, :]
    words = np.stack(philox4x32(counter, int(seed)), axis=-1)  # [M, k8, 4]
    halves = np.stack((words & np.uint64(0xFFFF), words >> np.uint64(16)), axis=-1).reshape(M, 8 * k8)[:, :K]
    return halves >= np.uint64(keep_threshold(p))


def dropout_mask_torch(seed, M: int, K: int, p: float, device="cpu") -> torch.Tensor:
    """`dropout_mask_numpy` as a bool tensor on `device`; `seed` an int or a one-element int64 tensor (read with a
    host sync: this is the reference and the plain-PyTorch path, not the kernels')."""
    return torch.from_numpy(dropout_mask_numpy(seed, M, K, p)).to(device)
