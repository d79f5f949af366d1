"""The Triton multi-adapter backend under TRITON_INTERPRET=1 on CPU tensors (a lean subset: the interpreter is
slow; the heavy grid runs on the torch / C++ paths in test_multi_ops.py). bf16 is checked on a GPU only."""
import os

import torch

if not torch.cuda.is_available():  # on a GPU machine these tests skip; the GPU ones run compiled Triton
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from lorafusion.multi import AdapterSpec  # noqa: E402
from multi_helpers import check_against_reference, make_specs, row_ids  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_only():
    from lorafusion.multi import triton_kernels

    if not triton_kernels.INTERPRET:
        pytest.skip("not under the Triton interpreter (a GPU machine, or triton imported before this module)")
    reason = triton_kernels.unavailable_reason()
    if reason:
        pytest.skip(reason)


CASES = [
    (torch.float32, 1, "one", 1),
    (torch.float32, 7, "distinct", 5),
    (torch.float32, 40, "no_adapter_rows", 16),  # scattered segments: kept short (the interpreter is slow)
    (torch.float32, 133, "zipf", 5),
    (torch.float16, 133, "zipf", 3),
    (torch.float16, 30, "uniform", 5),
    (torch.float16, 7, "zero_rows", 2),
    (torch.float16, 1, "no_adapter_rows", 2),
]


@pytest.mark.parametrize("dtype, T, dist, n", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_triton_matches_reference(dtype, T, dist, n):
    rng = np.random.default_rng(hash((T, dist, n)) % (1 << 31))
    K, N = 40, 36
    specs = make_specs(n, rng, max_rank=min(K, N))
    check_against_reference("triton", dtype, T, K, N, specs, row_ids(dist, T, n, rng), seed=int(rng.integers(1 << 40)))


def test_triton_rank_blocks_and_noncontig():
    """Ranks above the kernels' rank block (looped), rank 1, a non-contiguous input, no bias."""
    specs = {"big": AdapterSpec(40, 8.0, 0.2), "one": AdapterSpec(1, 2.0, 0.0), "mid": AdapterSpec(17, 17.0, 0.5)}
    ids = [0] * 20 + [2] * 9 + [-1] * 4 + [1] * 8 + [0] * 3
    check_against_reference("triton", torch.float32, len(ids), 45, 41, specs, ids, bias=False, noncontig=True)


def test_triton_all_rows_without_adapter():
    specs = {"a": AdapterSpec(4, 4.0, 0.1)}
    check_against_reference("triton", torch.float32, 9, 20, 18, specs, [-1] * 9)
