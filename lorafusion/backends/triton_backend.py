"""Triton backend: the five ops of ``lorafusion.reference`` as Triton kernels (see ``triton_kernels``).

On CUDA tensors the kernels run compiled (autotuned over a short config list). With ``TRITON_INTERPRET=1`` they
run in Triton's interpreter on CPU tensors (slow; for tests). Supported dtypes: float32, float16, bfloat16 with
float32 accumulation; the adapters may be wider than x (fp32 adapters over a bf16 base). In fp16, B (for dS) and
dS (for dA) are scaled by an exact power of two before the kernels round them to fp16 (:func:`fp16_pow2`): early in
training, without loss scaling, they sit in or under fp16's subnormal range.
"""
from __future__ import annotations

import os

import torch

from lorafusion import reference as ref

NAME = "triton"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE_TYPES = ("cuda", "cpu") if _INTERPRET else ("cuda",)

try:
    import triton

    from lorafusion.backends import triton_kernels as tk

    _IMPORT_ERROR = None
except Exception as exc:  # triton absent or too old: the backend reports why instead of failing the package
    triton = None
    tk = None
    _IMPORT_ERROR = exc

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SM_COUNT: dict[int, int] = {}


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported: {_IMPORT_ERROR!r}"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET is not 1)"
    return None


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _check(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the triton backend supports {_DTYPES}")
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} is on {t.device}; the triton backend runs on {DEVICE_TYPES}")


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} must be in [0, 1)")


def _i32(v: int) -> int:
    """A uint32 value as the signed int32 with the same bits (kernels bitcast it back)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _dropout_args(seed: int, p: float) -> tuple[int, int, int, float]:
    seed = int(seed) & ((1 << 64) - 1)
    return _i32(seed), _i32(seed >> 32), _i32(ref.dropout_threshold(p)), (1.0 / (1.0 - p) if p > 0 else 1.0)


def _rank_block(r: int, cap: int) -> int:
    """Rank tile: next power of two >= r, at least 16 (tl.dot's minimum), at most ``cap`` (loop/grid over r)."""
    return min(max(16, tk.next_pow2(r)), cap)


def _bucket(m: int) -> int:
    return tk.next_pow2(m)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so the split (atomic) paths are exercised by CPU tests
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the GEMMs fetch their main-loop operands by TMA (``LORAFUSION_TRITON_TMA=1``, opt-in until measured on
    a GPU): only for 16-bit operands (fp32 ieee products run on the FMA units, and their TMA tiles spilled registers
    in every config, triton_aot_check.py --ptxas-usage), where every operand qualifies (unit column stride, 16-byte
    aligned base and row stride) and the device has the unit (compute capability 9.0 or later; the interpreter
    emulates it)."""
    if os.environ.get("LORAFUSION_TRITON_TMA", "0") != "1":
        return False
    for t in tensors:
        if t.numel() == 0:  # the stored-term GEMMs of the blas placement (K = 0) load no operand at all
            return False
        if t.element_size() != 2 or t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    dev = tensors[0].device
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 9


def pow2_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, 1 / f) for each max |value| in ``amax`` (float32 tensors, elementwise): exact powers of two that bring a
    finite, non-zero amax into [2**13, 2**14). The exponent is clamped to [-126, 100] (an all-zero group gets
    2**100 and stays zero; down to 2**-126, a normal float32, any finite float32 amax is brought under fp16's
    65504: at -100, an amax above 2**114 stayed above it and became inf); a non-finite amax (inf, NaN) gets 1, so an
    overflow is passed on as it was."""
    amax = amax.to(torch.float32)
    e = torch.clamp(13.0 - torch.floor(torch.log2(amax)), -126.0, 100.0)
    e = torch.where(torch.isfinite(amax), e, torch.zeros_like(e)).to(torch.int32)
    return ((e + 127) << 23).view(torch.float32), ((127 - e) << 23).view(torch.float32)


def fp16_pow2(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, 1 / f) for the whole of ``t``, as 0-d float32 tensors computed on t's device (no host sync). An fp32
    rank-r factor (dS, or B early in training) is rounded to fp16 for the tensor cores; scaled by f first it keeps
    fp16's 11 significant bits however small its values are (unscaled, values under 6.1e-5 are fp16 subnormals and
    lose bits, under 6e-8 they vanish). f and 1 / f are exact, so multiplying the fp32 product by 1 / f afterwards
    loses nothing. See :func:`pow2_from_amax`; an empty t gets 1."""
    if t.numel() == 0:
        one = torch.ones((), dtype=torch.float32, device=t.device)
        return one, one
    return pow2_from_amax(t.detach().abs().amax())


def _descriptor(t: torch.Tensor):
    """A host TMA descriptor of a 2-D tensor; its tile shape is set per autotune config by the kernel's pre-hook."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [16, 16])


# ------------------------------------------------------------------------------------------------------------
# the five ops (signatures of lorafusion.reference)
# ------------------------------------------------------------------------------------------------------------
def lora_shrink(x2d, lora_A, seed: int, p: float) -> torch.Tensor:
    """S = D(X) A^T in float32."""
    _check("x2d", x2d)
    _check("lora_A", lora_A)
    _check_p(p)
    M, K = x2d.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; expected (r, {K})")
    S = torch.zeros(M, R, dtype=torch.float32, device=x2d.device)  # K splits accumulate into it
    if M == 0 or K == 0:
        return S
    lo, hi, thr, keep_scale = _dropout_args(seed, p)
    BR = _rank_block(R, 64)
    r_blocks = tk.cdiv(R, BR)
    sms = _num_sms(x2d.device)

    def grid(meta):
        m_blocks = tk.cdiv(M, meta["BM"])
        return m_blocks, r_blocks, tk.split_count(m_blocks * r_blocks, tk.cdiv(K, 2 * meta["BK"]), sms)

    with tk.on_device(x2d):
        tk.launch(
            tk._shrink_kernel, grid,
            x2d, lora_A, S, M, K, R, _bucket(M),
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), S.stride(0),
            lo, hi, thr, keep_scale,
            HAS_DROPOUT=p > 0, DOT_FP32=x2d.dtype == torch.float32, BR=BR, zero=(S,),
        )
    return S


def lora_expand_forward(x2d, weight, bias, S, lora_B, scale: float) -> torch.Tensor:
    """Y = X W^T + b + s * S B^T in x's dtype, one GEMM kernel."""
    _check("x2d", x2d)
    return _expand_forward(x2d, weight, bias, S, lora_B, scale, s_ready=False)


def _expand_forward(x2d, weight, bias, S, lora_B, scale: float, s_ready: bool = True) -> torch.Tensor:
    """``lora_expand_forward`` for a checked x2d; ``s_ready``: S is already contiguous float32 (as ``lora_shrink``
    returns it)."""
    _check("weight", weight)
    _check("lora_B", lora_B)
    M, K = x2d.shape
    N = weight.shape[0]
    R = lora_B.shape[1]
    if weight.shape[1] != K:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({N}, {K})")
    if lora_B.shape[0] != N or tuple(S.shape) != (M, R):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} / S {tuple(S.shape)} do not match ({N}, r) / ({M}, r)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({N},)")
    Y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return Y
    if not s_ready:
        S = S.to(torch.float32).contiguous()
    b = bias.contiguous() if bias is not None else S  # dummy pointer when HAS_BIAS is False
    grid = lambda meta: (tk.cdiv(M, meta["BM"]) * tk.cdiv(N, meta["BN"]),)  # noqa: E731
    if _use_tma(x2d, weight):
        with tk.on_device(x2d):
            tk._expand_forward_tma_kernel[grid](
                _descriptor(x2d), _descriptor(weight), b, S, lora_B, Y, M, N, K, R, _bucket(M),
                S.stride(0), lora_B.stride(0), lora_B.stride(1), Y.stride(0), float(scale),
                HAS_BIAS=bias is not None, BR=_rank_block(R, 64),
            )
        return Y
    with tk.on_device(x2d):
        tk.launch(
            tk._expand_forward_kernel, grid, x2d, weight, b, S, lora_B, Y, M, N, K, R, _bucket(M),
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), S.stride(0),
            lora_B.stride(0), lora_B.stride(1), Y.stride(0), float(scale),
            HAS_BIAS=bias is not None, DOT_FP32=x2d.dtype == torch.float32, BR=_rank_block(R, 64),
        )
    return Y


def _dy_shrink(dy2d, lora_B, S, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = dy2d.shape
    R = lora_B.shape[1]
    dS = torch.zeros(M, R, dtype=torch.float32, device=dy2d.device)
    dB = torch.zeros(N, R, dtype=torch.float32, device=dy2d.device)
    if M == 0 or N == 0:
        return dS, dB
    S = S.to(torch.float32).contiguous()
    inv = None
    if dy2d.dtype == torch.float16:  # B is rounded to fp16 in the kernel: keep its bits (see fp16_pow2)
        f, inv = fp16_pow2(lora_B)
        lora_B = lora_B.to(torch.float32) * f
    BR = _rank_block(R, 64)
    r_blocks = tk.cdiv(R, BR)
    sms = _num_sms(dy2d.device)

    def grid(meta):  # split the out-features when token blocks alone leave the GPU short of programs
        m_blocks = tk.cdiv(M, meta["BM"])
        return m_blocks, tk.split_count(m_blocks * r_blocks, tk.cdiv(N, 2 * meta["BN"]), sms), r_blocks

    with tk.on_device(dy2d):
        tk.launch(
            tk._dy_shrink_kernel, grid,
            dy2d, lora_B, S, dS, dB, M, N, R, _bucket(M),
            dy2d.stride(0), dy2d.stride(1), lora_B.stride(0), lora_B.stride(1), S.stride(0), dS.stride(0),
            dB.stride(0), float(scale),
            DOT_FP32=dy2d.dtype == torch.float32, BR=BR, zero=(dS, dB),
        )
    if inv is not None:
        dS.mul_(inv)
    return dS, dB


def lora_dy_shrink(dy2d, lora_B, S, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dS = s * dY B and dB = s * dY^T S, both float32, from one pass over dY."""
    _check("dy2d", dy2d)
    _check("lora_B", lora_B)
    M, N = dy2d.shape
    if lora_B.shape[0] != N or tuple(S.shape) != (M, lora_B.shape[1]):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} / S {tuple(S.shape)} do not match dy {tuple(dy2d.shape)}")
    return _dy_shrink(dy2d, lora_B, S, scale)


def _grad_A(x2d, dS, seed: int, p: float, want_bits: bool = False):
    """(dA float32, packed keep mask or None). The mask comes for free when p > 0 and ``want_bits``."""
    M, K = x2d.shape
    R = dS.shape[1]
    dA = torch.zeros(R, K, dtype=torch.float32, device=x2d.device)
    write_bits = want_bits and p > 0
    bits = torch.empty(M, K, dtype=torch.int8, device=x2d.device) if write_bits else dA
    if M == 0 or K == 0:
        return dA, (bits if write_bits else None)
    dS = dS.to(torch.float32).contiguous()
    inv = None
    if x2d.dtype == torch.float16:  # dS is rounded to fp16 in the kernel: keep its bits (see fp16_pow2)
        f, inv = fp16_pow2(dS)
        dS = dS * f
    lo, hi, thr, keep_scale = _dropout_args(seed, p)
    BR = _rank_block(R, 64)
    r_blocks = tk.cdiv(R, BR)
    sms = _num_sms(x2d.device)

    def grid(meta):  # split the tokens: K blocks alone are too few programs for a memory-bound pass
        k_blocks = tk.cdiv(K, meta["BK"])
        return k_blocks, tk.split_count(k_blocks * r_blocks, tk.cdiv(M, 2 * meta["BM"]), sms), r_blocks

    with tk.on_device(x2d):
        tk.launch(
            tk._grad_A_kernel, grid,
            x2d, dS, dA, bits, M, K, R, _bucket(M),
            x2d.stride(0), x2d.stride(1), dS.stride(0), dA.stride(0), bits.stride(0),
            lo, hi, thr, keep_scale,
            HAS_DROPOUT=p > 0, WRITE_BITS=write_bits, DOT_FP32=x2d.dtype == torch.float32, BR=BR, zero=(dA,),
        )
    if inv is not None:
        dA.mul_(inv)
    return dA, (bits if write_bits else None)


def _dropout_bits(M: int, K: int, seed: int, p: float, device, BK: int = 64) -> torch.Tensor:
    """The keep mask, one int8 (0/1) per element (``BK``: the kernel's column tile, for tests; 64 and its multiples
    share each Philox block among four columns, others draw one per element)."""
    bits = torch.empty(M, K, dtype=torch.int8, device=device)
    lo, hi, thr, _ = _dropout_args(seed, p)
    grid = (tk.cdiv(M, 32), tk.cdiv(K, BK))
    tk._dropout_bits_kernel[grid](bits, M, K, bits.stride(0), lo, hi, thr, BM=32, BK=BK)
    return bits


def _expand_backward(dy2d, weight, dS, lora_A, bits, p: float) -> torch.Tensor:
    M, N = dy2d.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    dX = torch.empty(M, K, dtype=dy2d.dtype, device=dy2d.device)
    if M == 0 or K == 0:
        return dX
    dS = dS.to(torch.float32).contiguous()
    keep_scale = 1.0 / (1.0 - p) if p > 0 else 1.0
    bits_arg = bits if bits is not None else dS  # dummy pointer when HAS_DROPOUT is False
    grid = lambda meta: (tk.cdiv(M, meta["BM"]) * tk.cdiv(K, meta["BN"]),)  # noqa: E731
    if _use_tma(dy2d, weight):
        tk._expand_backward_tma_kernel[grid](
            _descriptor(dy2d), _descriptor(weight), dS, lora_A, bits_arg, dX, M, N, K, R, _bucket(M),
            dS.stride(0), lora_A.stride(0), lora_A.stride(1), bits_arg.stride(0), dX.stride(0), keep_scale,
            HAS_DROPOUT=p > 0, BR=_rank_block(R, 64),
        )
        return dX
    tk.launch(
        tk._expand_backward_kernel, grid, dy2d, weight, dS, lora_A, bits_arg, dX, M, N, K, R, _bucket(M),
        dy2d.stride(0), dy2d.stride(1), weight.stride(0), weight.stride(1), dS.stride(0),
        lora_A.stride(0), lora_A.stride(1), bits_arg.stride(0), dX.stride(0), keep_scale,
        HAS_DROPOUT=p > 0, DOT_FP32=dy2d.dtype == torch.float32, BR=_rank_block(R, 64),
    )
    return dX


def lora_dropout_grad_A(x2d, dS, seed: int, p: float, a_dtype: torch.dtype) -> torch.Tensor:
    """dA = dS^T D(X) (mask regenerated from the seed), in ``a_dtype``."""
    _check("x2d", x2d)
    _check_p(p)
    if dS.dim() != 2 or dS.shape[0] != x2d.shape[0]:
        raise ValueError(f"dS has shape {tuple(dS.shape)}; expected ({x2d.shape[0]}, r)")
    with tk.on_device(x2d):
        return _grad_A(x2d, dS, seed, p)[0].to(a_dtype)


def lora_expand_backward(dy2d, weight, dS, lora_A, seed: int, p: float) -> torch.Tensor:
    """dX = dY W + D'(dS A) in dy's dtype, one GEMM kernel."""
    _check("dy2d", dy2d)
    _check("weight", weight)
    _check("lora_A", lora_A)
    _check_p(p)
    M, N = dy2d.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    if weight.shape[0] != N or lora_A.shape[1] != K or tuple(dS.shape) != (M, R):
        raise ValueError(f"weight {tuple(weight.shape)} / lora_A {tuple(lora_A.shape)} / dS {tuple(dS.shape)} "
                         f"do not match dy {tuple(dy2d.shape)}")
    with tk.on_device(dy2d):
        bits = _dropout_bits(M, K, seed, p, dy2d.device) if p > 0 and M > 0 and K > 0 else None
        return _expand_backward(dy2d, weight, dS, lora_A, bits, p)


def philox_uint32(seed: int, rows: int, cols: int, device) -> torch.Tensor:
    """The raw dropout draw per (row, col), from the Triton generator (int64; for tests)."""
    out = torch.empty(rows, cols, dtype=torch.int64, device=device)
    lo, hi, _, _ = _dropout_args(seed, 0.0)
    grid = (tk.cdiv(rows, 16), tk.cdiv(cols, 16))
    tk._philox_kernel[grid](out, rows, cols, lo, hi, BM=16, BN=16)
    return out


# ------------------------------------------------------------------------------------------------------------
# backend contract (lorafusion.backends)
# ------------------------------------------------------------------------------------------------------------
def forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p):
    """(Y, S): Y = X W^T + b + s * D(X) A^T B^T in x's dtype, S = D(X) A^T in float32."""
    S = lora_shrink(x2d, lora_A, seed, p)
    return _expand_forward(x2d, weight, bias, S, lora_B, scale), S


def backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    """(dX or None, dA, dB): dA, dB in float32, dX in dy's dtype."""
    return backward_with(_expand_backward, dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx)


def backward_with(dx_gemm, dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx):
    """``backward`` with ``dx_gemm(dy2d, weight, dS, lora_A, bits, p)`` computing dX (``triton_blas_backend``
    passes its own)."""
    dS, dB = lora_dy_shrink(dy2d, lora_B, S, scale)
    _check("x2d", x2d)
    _check_p(p)
    with tk.on_device(x2d):
        # grad_A regenerates the mask anyway: it hands it to the dX GEMM, one byte per element
        dA, bits = _grad_A(x2d, dS, seed, p, want_bits=need_dx)
        if not need_dx:
            return None, dA, dB
        _check("weight", weight)
        _check("lora_A", lora_A)
        return dx_gemm(dy2d, weight, dS, lora_A, bits, p), dA, dB
