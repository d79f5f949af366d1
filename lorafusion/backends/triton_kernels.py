"""Triton kernels of the fused LoRA linear (the math is in ``lorafusion.reference``).

Five kernels, split at the small tensor S as in LoRAFusion:

* ``_shrink_kernel``          S  = D(X) A^T                  one pass over X, mask regenerated in-tile
* ``_expand_forward_kernel``  Y  = X W^T + b + s S B^T       one GEMM; rank-r term added to the accumulator
                                                             before the single store of Y
* ``_dy_shrink_kernel``       dS = s dY B, dB = s dY^T S     one pass over dY
* ``_grad_A_kernel``          dA = dS^T D(X)                 one pass over X, mask regenerated in-tile (and,
                                                             for the backward, written out one byte/element)
* ``_expand_backward_kernel`` dX = dY W + D'(dS A)           one GEMM; the masked rank-r term is the initial
                                                             accumulator, dY W is added on, dX stored once

The dropout mask is ``reference.dropout_keep_mask``: one of the four words of Philox-4x32-10 (counter and word
from the column, see ``reference``), key (seed lo, seed hi), unsigned ``>= threshold``. ``HAS_DROPOUT`` is a
constexpr, so p == 0 compiles every bit of mask work out. One Philox block costs ~40 integer multiplies; drawn
per element it took about 75-100 us per pass over an 8192 x 4096 input on an H100/H200, several times the pass's
memory time. The streaming kernels' tiles span whole 64-column blocks, so ``philox_keep_tile`` draws one block per
four elements (the PTX of a 64 x 128 shrink tile went from 992 to 266 high multiplies per thread, sm_90,
``tests/lorafusion/triton_aot_check.py``). The dX GEMM's epilogue does not run Philox on its 128 x 256 tile
(register spills, measured +420 us) but reads the mask ``_grad_A_kernel`` just generated (32 MB write + read at
8192 x 4096; 4 MB bit-packed, but the reshape-based packing we tried failed Triton 3.6's LLVM lowering). Offsets
are formed in int64 so tensors past 2**31 elements index correctly.

Reductions over the token dimension (dB, dA) and, when the reduced dimension is split for parallelism (K in
shrink, N in dy_shrink, tokens in grad_A), the outputs are accumulated with relaxed fp32 atomics into zeroed
buffers: per-block partials plus a reduction would write and re-read the same number of bytes (blocks x N x r x 4)
and add a launch and a (blocks x N x r) buffer. The cost: S/dS/dB/dA are order-dependent at fp32 rounding (not
bitwise reproducible run to run on a GPU). Autotuning benchmarks these kernels on the live buffers, so the
launcher zeroes and reruns once after a fresh tune.

Under ``TRITON_INTERPRET=1`` every kernel runs one fixed config (autotuning in the interpreter is slow).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_PHILOX_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)


def _configs(gpu_list, interp):
    """The autotune list on a GPU; one config under the interpreter."""
    return [interp] if INTERPRET else gpu_list


def _cfg(num_warps=4, num_stages=1, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_SMEM_FALLBACK = 160 * 1024  # fits sm_80 (164 KB opt-in) and sm_90 (227 KB)
_SMEM_RESERVE = 8 * 1024  # the compiler's scratch (layout conversions, reductions)
_smem_optin: dict = {}


def _smem_budget(device) -> int:
    """Shared memory one program may use for its pipelined operand tiles, from the device's properties."""
    key = (device.type, device.index)
    if key not in _smem_optin:
        optin = 0
        if device.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(device)
            optin = getattr(props, "shared_memory_per_block_optin", 0)
        _smem_optin[key] = (optin or _SMEM_FALLBACK) - _SMEM_RESERVE
    return _smem_optin[key]


def gemm_tile_fits(c, elem: int, budget: int, m_bucket: int, extra_k: int = 0) -> bool:
    """A GEMM config's pipelined operand tiles (num_stages x BK, plus ``extra_k`` columns such as a rank tile, of
    BM + BN rows of ``elem`` bytes) fit the shared-memory budget, and its tile is not oversized for the token count
    (fewer configs to compile and time when there are few tokens). Shared by the single- and multi-adapter prunes."""
    kw = c.kwargs
    smem = (c.num_stages * kw["BK"] + extra_k) * (kw["BM"] + kw["BN"]) * elem
    return not (smem > budget or (m_bucket <= 64 and kw["BM"] > 64)
                or (m_bucket <= 256 and kw["BM"] * kw["BN"] > 128 * 128))


def _prune_gemm(configs, named_args, **kwargs):
    """Drop GEMM configs whose pipelined operand tiles overflow shared memory for this dtype, and the large
    tiles when there are few tokens (fewer configs to compile and time)."""
    x = named_args["x_ptr" if "x_ptr" in named_args else "dy_ptr"]
    elem, budget, m = max(x.element_size(), 2), _smem_budget(x.device), named_args["M_BUCKET"]
    out = [c for c in configs if gemm_tile_fits(c, elem, budget, m, extra_k=kwargs.get("BR", 64))]
    return out or configs[-1:]


def _tile_bytes(kernel_name, kw, named_args, BR):
    """Shared memory of the pipelined operand tiles of one memory-bound kernel config."""
    if kernel_name == "shrink":
        a, b = kw["BM"] * kw["BK"] * named_args["x_ptr"].element_size(), kw["BK"] * BR * 4
    elif kernel_name == "dy_shrink":
        a, b = kw["BM"] * kw["BN"] * named_args["dy_ptr"].element_size(), kw["BN"] * BR * 4
    else:
        a, b = kw["BM"] * kw["BK"] * named_args["x_ptr"].element_size(), kw["BM"] * BR * 4
    return a + b


def _prune_streaming(kernel_name):
    """Memory-bound kernels: configs whose tiles fit shared memory; with few tokens only the smallest."""

    def prune(configs, named_args, **kwargs):
        BR = kwargs.get("BR", named_args.get("BR", 16))
        x = named_args["dy_ptr" if kernel_name == "dy_shrink" else "x_ptr"]
        budget = _smem_budget(x.device)
        sized = sorted(((c.num_stages * _tile_bytes(kernel_name, c.kwargs, named_args, BR), i, c)
                        for i, c in enumerate(configs)), key=lambda t: (t[0], t[1]))
        if named_args["M_BUCKET"] <= 256:
            return [sized[0][2]]
        fit = [c for size, _, c in sized if size <= budget]
        return fit or [sized[0][2]]

    return prune


@triton.jit
def _cdiv(a, b):
    # not tl.cdiv: Triton's own @jit helpers are fixed as compiled or interpreted when triton is imported,
    # so kernels that use none of them also run interpreted after a late TRITON_INTERPRET=1 (test collection)
    return (a + b - 1) // b


@triton.jit
def _gemm_tile(acc, a_ptrs, b_ptrs, step_a, step_b, offs_k, K, BK: tl.constexpr, EVEN_K: tl.constexpr,
               DOT_FP32: tl.constexpr):
    """acc (BM x BN, fp32) += A B over the reduction length K: a_ptrs (BM x BK) and b_ptrs (BK x BN) point at
    reduction index 0 and advance by step_a / step_b per unit of it; offs_k = arange(BK)."""
    for k in range(0, _cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BK, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BK, other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BK * step_a
        b_ptrs += BK * step_b
    return acc


@triton.jit
def _rank_r_tile(acc, l_rows, w_cols, stride_wr, R, scale, out_ptr, BR: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += (scale L) W over the rank, in chunks of BR: l_rows (BM x 1) are the rows of the fp32 rank-r factor
    (S or dS, unit stride along r), w_cols (1 x BN) the columns of B^T or A (stride_wr along r); the product is
    taken in fp32, or in out_ptr's dtype with fp32 accumulation."""
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        r_ok = offs_r < R
        lt = tl.load(l_rows + offs_r[None, :], mask=r_ok[None, :], other=0.0) * scale
        wt = tl.load(w_cols + offs_r.to(tl.int64)[:, None] * stride_wr, mask=r_ok[:, None], other=0.0)
        if DOT_FP32:
            acc = tl.dot(lt, wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(lt.to(out_ptr.dtype.element_ty), wt.to(out_ptr.dtype.element_ty), acc)
    return acc


@triton.jit
def _philox_rounds(c0, c1, seed_lo, seed_hi):
    """Philox-4x32-10 of the counters (c0, c1, 0, 0) (uint32 tensors of one shape) under key (seed_lo, seed_hi):
    its four output words."""
    c2 = c0 * 0
    c3 = c2
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, _PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, _PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = _c2 * _PHILOX_ROUND_B
        c3 = _c0 * _PHILOX_ROUND_A
        k0 = k0 + _PHILOX_KEY_A
        k1 = k1 + _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def philox_draw(rows, cols, seed_lo, seed_hi):
    """The dropout draw (uint32) of every (row, col) of a tile, per ``lorafusion.reference``: word
    ``(col >> 4) & 3`` of Philox-4x32-10 with counter ``((col >> 6) * 16 + (col & 15), row, 0, 0)`` and key
    (seed_lo, seed_hi). One Philox block per element: ``philox_keep_tile`` shares each block among the four
    elements it serves, where the tile allows."""
    zero = tl.full([rows.shape[0], cols.shape[0]], 0, tl.uint32)
    ucols = cols.to(tl.uint32)
    c0, c1, c2, c3 = _philox_rounds(zero + ((ucols >> 6) * 16 + (ucols & 15))[None, :],
                                    zero + rows.to(tl.uint32)[:, None], seed_lo, seed_hi)
    word = ((ucols >> 4) & 3)[None, :]
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))


@triton.jit
def philox_keep(rows, cols, seed_lo, seed_hi, threshold):
    """Dropout keep mask of a tile: ``philox_draw >= threshold`` compared as unsigned 32-bit."""
    return philox_draw(rows, cols, seed_lo, seed_hi) >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def philox_keep_tile(rows, col0, seed_lo, seed_hi, threshold, BN: tl.constexpr):
    """``philox_keep(rows, col0 + arange(BN), ...)`` for a tile whose first column ``col0`` is a multiple of 64 (the
    caller's guarantee: its column tiles start at multiples of BN). With BN a multiple of 64 the tile's columns are
    whole 64-column blocks, whose 16 counters each serve four columns (64b + 16w + l takes word w of counter
    16b + l): one Philox block per four elements, a quarter of ``philox_keep``'s integer work. The four words'
    keep bits, drawn on a (rows x BN / 4) grid, are interleaved into column order by a join and a permute of
    bytes. Other BN: ``philox_keep`` per element."""
    if BN % 64 == 0:
        zero = tl.full([rows.shape[0], BN // 4], 0, tl.uint32)
        counters = (tl.arange(0, BN // 4) + (col0 >> 6) * 16).to(tl.uint32)
        w0, w1, w2, w3 = _philox_rounds(zero + counters[None, :], zero + rows.to(tl.uint32)[:, None],
                                        seed_lo, seed_hi)
        thr = threshold.to(tl.uint32, bitcast=True)
        # [.., i, j] holds word 2i + j
        keep = tl.join(tl.join((w0 >= thr).to(tl.int8), (w2 >= thr).to(tl.int8)),
                       tl.join((w1 >= thr).to(tl.int8), (w3 >= thr).to(tl.int8)))
        keep = tl.permute(tl.reshape(keep, [rows.shape[0], BN // 64, 16, 2, 2]), (0, 1, 3, 4, 2))
        return tl.reshape(keep, [rows.shape[0], BN]) != 0
    else:
        return philox_keep(rows, col0 + tl.arange(0, BN), seed_lo, seed_hi, threshold)


@triton.jit
def zero_dropped(x, keep):
    """``tl.where(keep, x, 0)`` (a dropped element becomes +0.0, whatever it held) through a bit mask as wide as
    x's elements, for a tile headed into ``tl.dot``: with a select on the 1-bit ``keep``, Triton 3.9's sm_80 pipeline
    moved the layout conversion of the dot operand onto ``keep`` and failed ("shared-memory element type bit width
    must be a multiple of 8; got 1"; found by tests/lorafusion/triton_aot_check.py --arch 80 --full)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True) & (-keep.to(tl.int16))
    else:
        bits = x.to(tl.int32, bitcast=True) & (-keep.to(tl.int32))
    return bits.to(x.dtype, bitcast=True)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _philox_kernel(out_ptr, rows, cols, seed_lo, seed_hi, BM: tl.constexpr, BN: tl.constexpr):
    """Test hook: the raw dropout draw of every (row, col), as int64."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    bits = philox_draw(offs_m, offs_n, seed_lo, seed_hi)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * cols + offs_n[None, :]
    tl.store(ptrs, bits.to(tl.int64), mask=mask)


@triton.jit
def _grouped_pid(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Swizzled program order: GROUP_M row-blocks share each column block while it is in L2."""
    pid = tl.program_id(0)
    num_m = _cdiv(M, BM)
    num_n = _cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _forward_epilogue(acc, offs_m, offs_n, M, N, s_ptr, stride_sm, lb_ptr, stride_bn, stride_br, R, scale, b_ptr,
                      y_ptr, stride_ym, HAS_BIAS: tl.constexpr, BR: tl.constexpr, DOT_FP32: tl.constexpr):
    """Y's tile: acc (X W^T) + (s S) B^T, r in chunks of BR, + b, stored once. Rows / cols past the edge wrap to
    valid ones for the loads (their results are never stored)."""
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    acc = _rank_r_tile(acc, s_ptr + rm[:, None] * stride_sm, lb_ptr + rn[None, :] * stride_bn, stride_br, R, scale,
                       y_ptr, BR, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _dx_tile_start(M, K, R, ds_ptr, stride_dsm, a_ptr, stride_ar, stride_ak, bits_ptr, stride_bits, keep_scale,
                   dx_ptr, HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, GROUP_M: tl.constexpr):
    """A dX tile's coordinates and its masked rank-r term D'(dS A): the accumulator the main loop adds dY W into,
    so only one BM x BN fp32 tile is ever live. Returns (pid_m, pid_n, offs_m, offs_c, rm, rc, acc)."""
    pid_m, pid_n = _grouped_pid(M, K, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = pid_n * BN + tl.arange(0, BN)
    rm = (offs_m % M).to(tl.int64)
    rc = (offs_c % K).to(tl.int64)
    acc = _rank_r_tile(tl.full([BM, BN], 0, tl.float32), ds_ptr + rm[:, None] * stride_dsm,
                       a_ptr + rc[None, :] * stride_ak, stride_ar, R, 1.0, dx_ptr, BR, DOT_FP32)
    if HAS_DROPOUT:
        keep = tl.load(bits_ptr + rm[:, None] * stride_bits + rc[None, :]) != 0
        acc = tl.where(keep, acc * keep_scale, 0.0)
    return pid_m, pid_n, offs_m, offs_c, rm, rc, acc


# --------------------------------------------------------------------------------------------------------------
# host side: launch arithmetic and the launcher
# --------------------------------------------------------------------------------------------------------------
# Host time bounds the layer at GPU sizes: the first H100 profile of this code (benchmarks/RESULTS.md, twelfth
# session) had the single-adapter step's kernels at 915 us and the step at 1540 us, the GPU waiting on Python. So the
# per-launch host work is kept small: plain-int arithmetic below (triton.cdiv and triton.next_power_of_2 are
# constexpr_functions, each call unwrapping its arguments: a quarter of the layer's host time), and ``launch``.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, on the host."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def split_count(blocks: int, work_blocks: int, num_sms: int) -> int:
    """How many ways to split a reduction so a memory-bound pass has about 4 programs per SM (at least 1,
    at most one split per ``work_blocks`` block of the reduced dimension)."""
    return max(1, min(cdiv(4 * num_sms, max(blocks, 1)), work_blocks))


class on_device:
    """Launch on the tensor's GPU (Triton launches on the current device); nothing to do when it is the current one
    (or the tensor is on the CPU, under the interpreter)."""

    def __init__(self, t):
        self.ctx = None
        if t.is_cuda:
            import torch

            if t.get_device() != torch.cuda.current_device():
                self.ctx = torch.cuda.device(t.device)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# (autotuned kernel, launch key) -> (its JIT function, the chosen config's launch keywords)
_CHOSEN: dict = {}
# (autotuned kernel, argument count) -> (positions of its key arguments, key arguments passed by keyword)
_KEY_POS: dict = {}
_ABSENT = object()  # a key argument not passed at all (the autotuner leaves it out of its key)


def _launch_key(kernel, args, kwargs) -> tuple:
    """A key at least as fine as the one ``kernel`` (a triton.autotune) files its choice under: its key arguments'
    values, then the dtype (or None) of every argument, positional and keyword. ``Autotuner.run`` keys on the key
    arguments and the ``str`` of each tensor argument's dtype, so two launches with equal keys here get the same
    config from it."""
    pos = _KEY_POS.get((kernel, len(args)))
    if pos is None:
        names = list(kernel.arg_names)
        at = {k: names.index(k) for k in kernel.keys}
        pos = _KEY_POS[(kernel, len(args))] = (tuple(i for i in at.values() if i < len(args)),
                                               tuple(k for k, i in at.items() if i >= len(args)))
    key_pos, key_kw = pos
    return (tuple([args[i] for i in key_pos]), tuple([kwargs.get(k, _ABSENT) for k in key_kw]),
            tuple([getattr(a, "dtype", None) for a in args]),
            tuple([(k, getattr(v, "dtype", None)) for k, v in kwargs.items()]))


def _chosen_config(kernel, args, kwargs):
    """The config the autotuner uses for these arguments, read from its cache under its own key (not from
    ``best_config``, which every launch of the kernel overwrites, from any thread); None when it has none (a
    patched ``Autotuner.run``, as ``tests/lorafusion/triton_aot_check.py`` installs)."""
    if len(kernel.configs) == 1:
        return kernel.configs[0]
    named = {**dict(zip(kernel.arg_names, args)), **{k: v for k, v in kwargs.items() if k in kernel.arg_names}}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return kernel.cache.get(tuple(key))


def launch(kernel, grid, *args, zero=(), **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``triton.autotune`` kernel, with less host work.

    The first launch for a key goes through the autotuner (which times the configs on a new key). Later ones go
    straight to the JIT function with the config it chose, skipping ``Autotuner.run``'s per-call binding of every
    argument into dicts and its key building. Configs with a pre-hook (the TMA descriptors' block shapes) always
    take the autotuner's path.

    ``zero``: buffers the kernel accumulates into (atomics) from zero. A fresh autotune runs the kernel once per
    config on them, so they are zeroed and the kernel run once more after one."""
    key = (kernel, _launch_key(kernel, args, kwargs))
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        fn, meta = chosen
        fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)
        return
    tuned_before = len(kernel.cache)
    kernel[grid](*args, **kwargs)
    if zero and len(kernel.cache) != tuned_before:
        for b in zero:
            b.zero_()
        kernel[grid](*args, **kwargs)
    cfg = _chosen_config(kernel, args, kwargs)
    if cfg is not None and cfg.pre_hook is None:
        _CHOSEN[key] = (kernel.fn, cfg.all_kwargs())


# --------------------------------------------------------------------------------------------------------------
# S = D(X) A^T   (grid: token blocks x rank blocks x K splits; K splits reduce with atomics into a zeroed S)
# --------------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        [_cfg(BM=64, BK=128, num_warps=4, num_stages=4), _cfg(BM=128, BK=64, num_warps=8, num_stages=4),
         _cfg(BM=64, BK=256, num_warps=8, num_stages=3), _cfg(BM=32, BK=64, num_warps=4, num_stages=3)],
        _cfg(BM=16, BK=64)),
    key=["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_streaming("shrink")},
)
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _shrink_kernel(x_ptr, a_ptr, s_ptr, M, K, R, M_BUCKET,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_sm,
                   seed_lo, seed_hi, threshold, keep_scale,
                   HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BR: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_split = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    m_ok = offs_m < M
    r_ok = offs_r < R
    k_per_split = _cdiv(_cdiv(K, BK), n_split) * BK
    k_start = pid_split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + (offs_r % R).to(tl.int64)[None, :] * stride_ar
    acc = tl.full([BM, BR], 0, tl.float32)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < k_end
        x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        if HAS_DROPOUT:  # k0 is a multiple of BK (k_per_split is)
            x = zero_dropped(x, philox_keep_tile(offs_m, k0, seed_lo, seed_hi, threshold, BK))
        a = tl.load(a_cols + offs_k.to(tl.int64)[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :]
    if n_split == 1:
        tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])
    else:
        tl.atomic_add(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------------------------
# Y = X W^T + b + s S B^T
# --------------------------------------------------------------------------------------------------------------
_GEMM_CONFIGS = [
    _cfg(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
    _cfg(BM=256, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
    _cfg(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=4),
]
_GEMM_INTERP = _cfg(BM=32, BN=32, BK=32, GROUP_M=4)
_EVEN_K = {"EVEN_K": lambda args: args["K"] % args["BK"] == 0}
_EVEN_N = {"EVEN_K": lambda args: args["N"] % args["BK"] == 0}


@triton.autotune(configs=_configs(_GEMM_CONFIGS, _GEMM_INTERP), key=["M_BUCKET", "N", "K", "R"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_gemm})
@triton.heuristics(_EVEN_K)
@triton.jit
def _expand_forward_kernel(x_ptr, w_ptr, b_ptr, s_ptr, lb_ptr, y_ptr, M, N, K, R, M_BUCKET,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_bn, stride_br,
                           stride_ym, scale,
                           HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BR: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr):
    pid_m, pid_n = _grouped_pid(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    # rows/cols past the edge wrap to valid ones (their results are never stored): loads need no M/N mask
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BK).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = _gemm_tile(tl.full([BM, BN], 0, tl.float32), x_ptrs, w_ptrs, stride_xk, stride_wk, offs_k, K, BK, EVEN_K,
                     DOT_FP32)
    # rank-r term, added in the tile before the single store: acc += (s S) B^T, r in chunks of BR
    _forward_epilogue(acc, offs_m, offs_n, M, N, s_ptr, stride_sm, lb_ptr, stride_bn, stride_br, R, scale, b_ptr,
                      y_ptr, stride_ym, HAS_BIAS, BR, DOT_FP32)


# --------------------------------------------------------------------------------------------------------------
# The same two GEMMs with the operand tiles of the main K loop fetched by the Tensor Memory Accelerator (TMA: host
# tensor descriptors, hardware bounds handling, no address arithmetic in the loop), for Hopper and later. Opt-in
# (LORAFUSION_TRITON_TMA=1, see triton_backend) until measured against the pointer kernels on a GPU; the rank-r term,
# bias, mask and store are those of the pointer kernels.
# --------------------------------------------------------------------------------------------------------------
def _tma_blocks_forward(nargs):
    """Autotune pre-hook: the descriptors' tile shapes follow the config being tried."""
    nargs["x_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _tma_blocks_backward(nargs):
    nargs["dy_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BK"], nargs["BN"]]


def _tma_configs(hook):
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)
            for c in _configs(_GEMM_CONFIGS, _GEMM_INTERP)]


def _prune_gemm_tma(configs, named_args, **kwargs):
    named = dict(named_args)
    named.setdefault("x_ptr", named.get("x_desc", named.get("dy_desc")).base)
    return _prune_gemm(configs, named, **kwargs)


@triton.autotune(configs=_tma_configs(_tma_blocks_forward), key=["M_BUCKET", "N", "K", "R"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_gemm_tma})
@triton.jit
def _expand_forward_tma_kernel(x_desc, w_desc, b_ptr, s_ptr, lb_ptr, y_ptr, M, N, K, R, M_BUCKET,
                               stride_sm, stride_bn, stride_br, stride_ym, scale,
                               HAS_BIAS: tl.constexpr, BR: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # 16-bit operands only (triton_backend._use_tma): products on tensor cores, never the fp32 ieee path
    pid_m, pid_n = _grouped_pid(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.full([BM, BN], 0, tl.float32)
    for k in range(0, _cdiv(K, BK)):  # tiles past K, M or N arrive zero-filled
        a = x_desc.load([pid_m * BM, k * BK])
        b = w_desc.load([pid_n * BN, k * BK])
        acc = tl.dot(a, b.to(a.dtype).T, acc)
    _forward_epilogue(acc, offs_m, offs_n, M, N, s_ptr, stride_sm, lb_ptr, stride_bn, stride_br, R, scale, b_ptr,
                      y_ptr, stride_ym, HAS_BIAS, BR, False)


@triton.autotune(configs=_tma_configs(_tma_blocks_backward), key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_gemm_tma})
@triton.jit
def _expand_backward_tma_kernel(dy_desc, w_desc, ds_ptr, a_ptr, bits_ptr, dx_ptr, M, N, K, R, M_BUCKET,
                                stride_dsm, stride_ar, stride_ak, stride_bits, stride_dxm, keep_scale,
                                HAS_DROPOUT: tl.constexpr, BR: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # 16-bit operands only (triton_backend._use_tma): products on tensor cores, never the fp32 ieee path
    pid_m, pid_n, offs_m, offs_c, rm, rc, acc = _dx_tile_start(
        M, K, R, ds_ptr, stride_dsm, a_ptr, stride_ar, stride_ak, bits_ptr, stride_bits, keep_scale, dx_ptr,
        HAS_DROPOUT, False, BR, BM, BN, GROUP_M)
    for n in range(0, _cdiv(N, BK)):  # reduction over the out-features, zero-filled past N
        a = dy_desc.load([pid_m * BM, n * BK])
        b = w_desc.load([n * BK, pid_n * BN])
        acc = tl.dot(a, b.to(a.dtype), acc)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_c[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_c < K)[None, :])


# --------------------------------------------------------------------------------------------------------------
# dS = s dY B ; dB = s dY^T S   (one pass over dY; grid: token blocks x out-feature splits x rank blocks;
# dB reduced over token blocks with atomics, dS over out-feature splits when there is more than one)
# --------------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        [_cfg(BM=64, BN=64, num_warps=4, num_stages=3), _cfg(BM=128, BN=64, num_warps=8, num_stages=3),
         _cfg(BM=256, BN=32, num_warps=8, num_stages=3)],
        _cfg(BM=16, BN=32)),
    key=["M_BUCKET", "N", "R"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_streaming("dy_shrink")},
)
@triton.jit
def _dy_shrink_kernel(dy_ptr, lb_ptr, s_ptr, ds_ptr, db_ptr, M, N, R, M_BUCKET,
                      stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_dsm, stride_dbn, scale,
                      DOT_FP32: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_r = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    m_ok = offs_m < M
    r_ok = offs_r < R
    s = tl.load(s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :],
                mask=m_ok[:, None] & r_ok[None, :], other=0.0) * scale
    if not DOT_FP32:
        s = s.to(dy_ptr.dtype.element_ty)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    b_cols = lb_ptr + offs_r.to(tl.int64)[None, :] * stride_br
    ds = tl.full([BM, BR], 0, tl.float32)
    n_per_split = _cdiv(_cdiv(N, BN), n_split) * BN
    n_start = pid_split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < n_end
        dy = tl.load(dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :],
                     other=0.0)
        b = tl.load(b_cols + offs_n.to(tl.int64)[:, None] * stride_bn, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            ds = tl.dot(dy.to(tl.float32), b.to(tl.float32), ds, input_precision="ieee")
            db = tl.dot(tl.trans(dy.to(tl.float32)), s, input_precision="ieee")
        else:
            ds = tl.dot(dy, b.to(dy.dtype), ds)
            db = tl.dot(tl.trans(dy), s)
        db_ptrs = db_ptr + offs_n.to(tl.int64)[:, None] * stride_dbn + offs_r[None, :]
        tl.atomic_add(db_ptrs, db, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    ds = ds * scale
    ds_ptrs = ds_ptr + offs_m.to(tl.int64)[:, None] * stride_dsm + offs_r[None, :]
    if n_split == 1:
        tl.store(ds_ptrs, ds, mask=m_ok[:, None] & r_ok[None, :])
    else:
        tl.atomic_add(ds_ptrs, ds, mask=m_ok[:, None] & r_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------------------------
# dA = dS^T D(X)   (one pass over X; grid: K blocks x token splits x rank blocks, token splits reduced with
# atomics). With WRITE_BITS it also stores the keep mask it regenerated, one byte per element, so the dX GEMM
# reads it instead of running Philox on a 128 x 256 tile in its epilogue (measured: +420 us at 8192 x 4096).
# --------------------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        [_cfg(BM=64, BK=64, num_warps=4, num_stages=3), _cfg(BM=64, BK=128, num_warps=4, num_stages=4),
         _cfg(BM=128, BK=64, num_warps=8, num_stages=3)],
        _cfg(BM=32, BK=64)),
    key=["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_streaming("grad_A")},
)
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _grad_A_kernel(x_ptr, ds_ptr, da_ptr, bits_ptr, M, K, R, M_BUCKET,
                   stride_xm, stride_xk, stride_dsm, stride_dar, stride_bits,
                   seed_lo, seed_hi, threshold, keep_scale,
                   HAS_DROPOUT: tl.constexpr, WRITE_BITS: tl.constexpr, DOT_FP32: tl.constexpr, BR: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_split = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_r = tl.program_id(2)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_r = pid_r * BR + tl.arange(0, BR)
    k_ok = offs_k < K
    r_ok = offs_r < R
    m_per_split = _cdiv(_cdiv(M, BM), n_split) * BM
    m_start = pid_split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.full([BR, BK], 0, tl.float32)
    x_cols = x_ptr + offs_k.to(tl.int64)[None, :] * stride_xk
    first_r = offs_k * 0 + pid_r == 0  # one rank block writes the mask
    for m0 in range(m_start, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < m_end
        x = tl.load(x_cols + offs_m.to(tl.int64)[:, None] * stride_xm, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = philox_keep_tile(offs_m, pid_k * BK, seed_lo, seed_hi, threshold, BK)
            x = zero_dropped(x, keep)
            if WRITE_BITS:
                k_ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_k[None, :]
                tl.store(k_ptrs, keep.to(tl.int8), mask=m_ok[:, None] & (k_ok & first_r)[None, :])
        ds = tl.load(ds_ptr + offs_m.to(tl.int64)[:, None] * stride_dsm + offs_r[None, :],
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(tl.trans(ds), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(ds.to(x.dtype)), x, acc)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    da_ptrs = da_ptr + offs_r.to(tl.int64)[:, None] * stride_dar + offs_k[None, :]
    if n_split == 1:
        tl.store(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])
    else:
        tl.atomic_add(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _dropout_bits_kernel(bits_ptr, M, K, stride_bits, seed_lo, seed_hi, threshold,
                         BM: tl.constexpr, BK: tl.constexpr):
    """The keep mask alone, one byte per element as ``_grad_A_kernel`` writes it (for ``lora_expand_backward``
    called on its own)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = philox_keep_tile(offs_m, tl.program_id(1) * BK, seed_lo, seed_hi, threshold, BK)
    k_ptrs = bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_k[None, :]
    tl.store(k_ptrs, keep.to(tl.int8), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


# --------------------------------------------------------------------------------------------------------------
# dX = dY W + D'(dS A)
# --------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_GEMM_CONFIGS, _GEMM_INTERP), key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT"],
                 prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_gemm})
@triton.heuristics(_EVEN_N)
@triton.jit
def _expand_backward_kernel(dy_ptr, w_ptr, ds_ptr, a_ptr, bits_ptr, dx_ptr, M, N, K, R, M_BUCKET,
                            stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_ar, stride_ak,
                            stride_bits, stride_dxm, keep_scale,
                            HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, BR: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            EVEN_K: tl.constexpr):
    # output tile (BM x BN) of dX (M x K); the reduction runs over the out-features N in steps of BK.
    # EVEN_K here means N % BK == 0.
    pid_m, pid_n, offs_m, offs_c, rm, rc, acc = _dx_tile_start(
        M, K, R, ds_ptr, stride_dsm, a_ptr, stride_ar, stride_ak, bits_ptr, stride_bits, keep_scale, dx_ptr,
        HAS_DROPOUT, DOT_FP32, BR, BM, BN, GROUP_M)
    offs_n = tl.arange(0, BK).to(tl.int64)
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + rc[None, :] * stride_wk + offs_n[:, None] * stride_wn
    acc = _gemm_tile(acc, dy_ptrs, w_ptrs, stride_dyn, stride_wn, offs_n, N, BK, EVEN_K, DOT_FP32)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_c[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_c < K)[None, :])
