"""Triton kernels of the multi-adapter (segmented) LoRA linear; layout in ``lorafusion.multi.segments``.

* ``_seg_shrink_kernel``  flat[seg rows] = [s] D?(X[rows]) W_k^T     one program per (segment tile, rank block)
                          (S = D(X) A^T in forward; dS = s dY B in backward)
* ``_seg_grad_kernel``    G_k = [s] L_k^T D?(M[rows of k])           one program per (slot, column block, rank
                          block, row split), looping over its share of the slot's rows (dA = dS^T D(X);
                          dB^T = s S^T dY); with several splits the parts add into the zeroed G by fp32 atomics,
                          so dA / dB are then order-dependent at fp32 rounding on a GPU, as the single-adapter
                          kernels' are
* ``_seg_gemm_kernel``    Out = A W' [+ b] + sum over the segments overlapping the row block of
                          [s] D'?(L_seg Wc_k)                        the big GEMM with the rank-r term in its
                          epilogue (Y = X W^T + b + s S B^T; dX = dY W + D'(dS A))

The GEMM is autotuned (tile sizes, grouped program order); its row blocks find their segments in
``SegmentTables.block_lookup(LOOKUP_M)`` at a 16-row granularity, the other kernels' tiles in
``SegmentTables.tiles(BM)``; any number of adapters and ranks 1-256 (rank is looped in blocks). Only present
adapters appear, so an absent adapter costs nothing. Dropout masks: ``philox_keep_tile`` of
``lorafusion.backends.triton_kernels`` keyed by the global row.
The main GEMM and the rank-r products run on tensor cores in the input's dtype with fp32 accumulation (ieee fp32
throughout for fp32 input); S, dS and the adapters' gradients are kept in fp32. In fp16 the fp32 factor a
gradient kernel rounds (dS, and the stacked B in dS = s dY B) is first scaled by an exact power of two per adapter
(``triton_backend.pow2_from_amax``) so tiny values keep their bits. Dropped elements are zeroed in the
input's dtype and 1 / (1 - p) is applied once to the fp32 accumulator.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    from lorafusion.backends import triton_kernels as _tk
    from lorafusion.backends.triton_kernels import (_cfg, _configs, _gemm_tile, _grouped_pid, philox_keep_tile,
                                                    zero_dropped)
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or the single-adapter kernels failed to import
    _IMPORT_ERROR = exc

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton unavailable: {_IMPORT_ERROR}"
    if not INTERPRET and not torch.cuda.is_available():
        return "triton needs a CUDA device (or TRITON_INTERPRET=1)"
    return None


if _IMPORT_ERROR is None:

    @triton.jit
    def _segment(seg_ptr, si):
        """Segment si of the tables: its start row, end row, slot, and first row inside the slot's block."""
        return (tl.load(seg_ptr + 4 * si), tl.load(seg_ptr + 4 * si + 1), tl.load(seg_ptr + 4 * si + 2),
                tl.load(seg_ptr + 4 * si + 3))

    @triton.jit
    def _slot(slot_ptr, k):
        """Slot k of the tables: its rank, row offset in the concatenated weights, element offset in the flat
        buffer."""
        return tl.load(slot_ptr + 3 * k), tl.load(slot_ptr + 3 * k + 1), tl.load(slot_ptr + 3 * k + 2)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _seg_shrink_kernel(x_ptr, w_ptr, out_ptr, tiles_ptr, seg_ptr, slot_ptr, thr_ptr, inv_ptr, scale_ptr,
                           K, stride_xm, stride_xk, seed_lo, seed_hi,
                           DROPOUT: tl.constexpr, SCALED: tl.constexpr, TC: tl.constexpr,
                           BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        t = tl.program_id(0)
        rb = tl.program_id(1) * BR
        si = tl.load(tiles_ptr + 2 * t)
        r0 = tl.load(tiles_ptr + 2 * t + 1).to(tl.int64)
        start, end, k, srow = _segment(seg_ptr, si)
        r, w_off, f_off = _slot(slot_ptr, k)
        if rb < r:
            rows = r0 + tl.arange(0, BM)
            rmask = rows < end
            rr = rb + tl.arange(0, BR)
            rrmask = rr < r
            acc = tl.zeros([BM, BR], dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < K
                x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                if DROPOUT:  # k0 is a multiple of BK
                    x = zero_dropped(x, philox_keep_tile(rows, k0, seed_lo, seed_hi, tl.load(thr_ptr + k), BK))
                w = tl.load(w_ptr + (w_off + rr)[None, :].to(tl.int64) * K + ks[:, None],
                            mask=rrmask[None, :] & kmask[:, None], other=0.0)
                if TC:
                    acc = tl.dot(x, w.to(x.dtype), acc)
                else:
                    acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            if DROPOUT:  # the segment's 1 / (1 - p), once on the accumulator
                acc = acc * tl.load(inv_ptr + k)
            if SCALED:
                acc = acc * tl.load(scale_ptr + k)
            optr = out_ptr + f_off + (srow + rows - start)[:, None] * r + rr[None, :]
            tl.store(optr, acc, mask=rmask[:, None] & rrmask[None, :])

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _seg_grad_kernel(l_ptr, m_ptr, g_ptr, seg_ptr, slot_ptr, sptr_ptr, sidx_ptr, thr_ptr, inv_ptr, scale_ptr,
                         N, stride_mm, stride_mn, seed_lo, seed_hi, SPLITS,
                         DROPOUT: tl.constexpr, SCALED: tl.constexpr, TC: tl.constexpr, ATOMIC: tl.constexpr,
                         BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
        k = tl.program_id(0)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rb = (tl.program_id(2) // SPLITS) * BR
        split = tl.program_id(2) % SPLITS  # this program's share of the slot's row blocks: every SPLITS-th one
        r, w_off, f_off = _slot(slot_ptr, k)
        if rb < r:
            cmask = cols < N
            rr = rb + tl.arange(0, BR)
            rrmask = rr < r
            acc = tl.zeros([BR, BN], dtype=tl.float32)
            lo = tl.load(sptr_ptr + k)
            hi = tl.load(sptr_ptr + k + 1)
            for j in range(lo, hi):
                si = tl.load(sidx_ptr + j)
                start, end, _, srow = _segment(seg_ptr, si)
                for r0 in range(start + split * BM, end, BM * SPLITS):
                    rows = r0 + tl.arange(0, BM)
                    rmask = rows < end
                    m = tl.load(m_ptr + rows[:, None] * stride_mm + cols[None, :].to(tl.int64) * stride_mn,
                                mask=rmask[:, None] & cmask[None, :], other=0.0)
                    if DROPOUT:
                        m = zero_dropped(m, philox_keep_tile(rows, tl.program_id(1) * BN, seed_lo, seed_hi,
                                                             tl.load(thr_ptr + k), BN))
                    lt = tl.load(l_ptr + f_off + (srow + rows - start)[:, None] * r + rr[None, :],
                                 mask=rmask[:, None] & rrmask[None, :], other=0.0)
                    if TC:
                        acc = tl.dot(tl.trans(lt.to(m.dtype)), m, acc)
                    else:
                        acc = tl.dot(tl.trans(lt), m.to(tl.float32), acc, input_precision="ieee")
            if DROPOUT:  # the slot's 1 / (1 - p), once on the accumulator
                acc = acc * tl.load(inv_ptr + k)
            if SCALED:
                acc = acc * tl.load(scale_ptr + k)
            gptr = g_ptr + (w_off + rr)[:, None].to(tl.int64) * N + cols[None, :]
            if ATOMIC:  # the row splits add into the zeroed G
                tl.atomic_add(gptr, acc, mask=rrmask[:, None] & cmask[None, :], sem="relaxed")
            else:
                tl.store(gptr, acc, mask=rrmask[:, None] & cmask[None, :])

    # The big GEMM's tiles, autotuned per (token bucket, N, K, dropout, dtype), with grouped (L2-friendly) program
    # order. 16-bit input: the first config is the one fixed config of earlier versions. In the sm_90 compile
    # (tests/lorafusion/triton_aot_check.py --only multi --ptxas-usage, Triton 3.9, 8192 x 4096 -> 4096 bf16) the
    # 128 x 128 and 64 x 128 tiles spill nothing with or without dropout; 128 x 256 spills nothing without dropout
    # and 368 B per thread with it, so the prune keeps it for dropout-free launches only; 256 x 128 spilled 56 / 640 B
    # and is left out. fp32 input (ieee products on the FMA units) keeps its small tile.
    _SEG_GEMM_16BIT = [
        _cfg(BM=128, BN=128, BK=64, BR=16, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BM=128, BN=256, BK=64, BR=16, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BM=128, BN=128, BK=64, BR=16, GROUP_M=8, num_warps=8, num_stages=4),
        _cfg(BM=64, BN=128, BK=64, BR=16, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    _SEG_GEMM_FP32 = [_cfg(BM=64, BN=64, BK=32, BR=16, GROUP_M=8, num_warps=4, num_stages=3)]
    _FP32_IDS = {id(c) for c in _SEG_GEMM_FP32}  # the autotuner hands the prune these same objects
    # BM spans two LOOKUP_M sub-blocks, so the interpreter tests exercise the lookup of wider row blocks
    _SEG_GEMM_INTERP = _cfg(BM=32, BN=64, BK=32, BR=16, GROUP_M=4)
    LOOKUP_M = 16  # row granularity of the segment lookup: every config's BM is a multiple of it

    def _prune_seg_gemm(configs, named_args, **kwargs):
        """fp32 input: its own config. 16-bit: configs whose pipelined tiles fit shared memory, and with few tokens
        only the small-M tiles (fewer configs to compile and time)."""
        a = named_args["a_ptr"]
        if a.dtype == torch.float32:
            return [c for c in configs if id(c) in _FP32_IDS] or configs[-1:]
        sixteen = [c for c in configs if id(c) not in _FP32_IDS]
        elem, budget, m = a.element_size(), _tk._smem_budget(a.device), named_args["M_BUCKET"]
        # with the mask drawn over the tile, the larger tiles spill (see the list above)
        out = [c for c in sixteen if _tk.gemm_tile_fits(c, elem, budget, m)
               and not (kwargs.get("DROPOUT") and c.kwargs["BM"] * c.kwargs["BN"] > 128 * 128)]
        return out or sixteen[-1:]

    @triton.autotune(configs=_configs(_SEG_GEMM_16BIT + _SEG_GEMM_FP32, _SEG_GEMM_INTERP),
                     key=["M_BUCKET", "N", "K", "DROPOUT", "SCALED"],
                     prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_seg_gemm})
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _seg_gemm_kernel(a_ptr, w_ptr, bias_ptr, l_ptr, wc_ptr, out_ptr, blo_ptr, bhi_ptr,
                         seg_ptr, slot_ptr, thr_ptr, inv_ptr, scale_ptr,
                         M, N, K, M_BUCKET, stride_am, stride_ak, stride_wk, stride_wn, stride_om, seed_lo, seed_hi,
                         HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr,
                         LOOKUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         BR: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        pid_m, pid_n = _grouped_pid(M, N, BM, BN, GROUP_M)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rows64 = rows.to(tl.int64)
        rmask = rows < M
        cmask = cols < N
        # The segments' rank-r terms first, built in the accumulator the GEMM then adds on, so no second BM x BN
        # tile is live while the dropout mask is drawn. With the rank block at 16 this cut the register spills of
        # the bf16 dX variant (128 x 128 tiles, dropout, sm_90) from 2,112 / 2,420 bytes of spill stores / loads per
        # thread to 12 / 12, and the forward's from 36 / 28 to 16 / 16 (tests/lorafusion/triton_aot_check.py
        # --ptxas-usage).
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        # segments overlapping this row block: from the lookup's first and last LOOKUP-row sub-blocks in it
        lo = tl.load(blo_ptr + (pid_m * BM) // LOOKUP)
        hi = tl.load(bhi_ptr + (tl.minimum(pid_m * BM + BM, M) - 1) // LOOKUP)
        for si in range(lo, hi):
            start, end, k, srow = _segment(seg_ptr, si)
            r, w_off, f_off = _slot(slot_ptr, k)
            smask = (rows64 >= start) & (rows64 < end)
            # Segments hold disjoint rows and lt is zero outside this one, so acc's rows of this segment hold its
            # term alone: it is built in acc and masked / scaled there, rows of other segments untouched.
            for rb in range(0, r, BR):
                rr = rb + tl.arange(0, BR)
                rrmask = rr < r
                lt = tl.load(l_ptr + f_off + (srow + rows64 - start)[:, None] * r + rr[None, :],
                             mask=smask[:, None] & rrmask[None, :], other=0.0)
                wc = tl.load(wc_ptr + (w_off + rr)[:, None].to(tl.int64) * N + cols[None, :],
                             mask=rrmask[:, None] & cmask[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(lt, wc, acc, input_precision="ieee")
                else:  # tensor cores in the input's dtype, fp32 accumulation (as the single-adapter GEMMs)
                    acc = tl.dot(lt.to(a_ptr.dtype.element_ty), wc.to(a_ptr.dtype.element_ty), acc)
            factor = 1.0
            if DROPOUT:
                factor = tl.load(inv_ptr + k)
            if SCALED:
                factor = factor * tl.load(scale_ptr + k)
            if DROPOUT:
                keep = philox_keep_tile(rows, pid_n * BN, seed_lo, seed_hi, tl.load(thr_ptr + k), BN)
                acc = tl.where(smask[:, None], tl.where(keep, acc * factor, 0.0), acc)
            elif SCALED:
                acc = tl.where(smask[:, None], acc * factor, acc)
        # the main K loop (the single-adapter GEMMs' own): rows / cols past the edge wrap to valid ones for the
        # loads (never stored), so only a ragged K needs masks
        offs_k = tl.arange(0, BK).to(tl.int64)
        a_ptrs = a_ptr + (rows % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + (cols % N).to(tl.int64)[None, :] * stride_wn
        acc = _gemm_tile(acc, a_ptrs, w_ptrs, stride_ak, stride_wk, offs_k, K, BK, EVEN_K, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


def _seed_words(seed: int) -> tuple[int, int]:
    def s32(v):
        return v - (1 << 32) if v >= (1 << 31) else v
    seed &= (1 << 64) - 1
    return s32(seed & 0xFFFFFFFF), s32(seed >> 32)


def _tables_extra(t):
    """Per-slot int32 thresholds (uint32 bit patterns) and float32 1/(1-p), cached on the tables."""
    if not hasattr(t, "_triton_extra"):
        from lorafusion.reference import dropout_threshold

        thr = [dropout_threshold(p) for p in t._segs.slot_p]
        thr = [v - (1 << 32) if v >= (1 << 31) else v for v in thr]
        inv = [1.0 / (1.0 - p) for p in t._segs.slot_p]
        t._triton_extra = (torch.tensor(thr, dtype=torch.int32, device=t.device),
                           torch.tensor(inv, dtype=torch.float32, device=t.device))
    return t._triton_extra


def _small():
    return INTERPRET


def _slot_ids(t):
    """(slot of each stacked-weight row, slot of each flat-buffer element) as device tensors, cached on the tables."""
    if not hasattr(t, "_slot_ids"):
        ranks = [info[0] for info in t.slot_info]
        sizes = [info[0] * info[5] for info in t.slot_info]  # r x rows of the slot
        k = torch.arange(len(ranks))
        t._slot_ids = (torch.repeat_interleave(k, torch.tensor(ranks, dtype=torch.int64)).to(t.device),
                       torch.repeat_interleave(k, torch.tensor(sizes, dtype=torch.int64)).to(t.device))
    return t._slot_ids


def _pow2_per_slot(values, ids, num_slots):
    """(f, 1 / f) per slot (see ``triton_backend.pow2_from_amax``): one adapter's magnitudes, or its overflow, do
    not change another's scaling."""
    from lorafusion.backends.triton_backend import pow2_from_amax

    amax = torch.zeros(num_slots, dtype=torch.float32, device=values.device)
    amax = amax.scatter_reduce(0, ids, values.detach().abs().to(torch.float32), "amax", include_self=True)
    return pow2_from_amax(amax)


def shrink(x, w_cat, t, seed, dropout, scaled):
    t.check_operands("multi-adapter shrink", x.device, rows=x.shape[0], w_rows=w_cat.shape[0])
    if w_cat.shape[1] != x.shape[1]:
        raise ValueError(f"multi-adapter shrink: stacked weights {tuple(w_cat.shape)} do not match input "
                         f"{tuple(x.shape)}")
    w_cat = w_cat.contiguous()  # the kernels index the stacked adapters as dense rows
    out = torch.empty(t.s_numel, dtype=torch.float32, device=x.device)
    if t.num_segments == 0 or t.s_numel == 0:
        return out
    unscale = None
    if x.dtype == torch.float16:  # the adapters are rounded to fp16 in the kernel: keep a tiny B's bits
        row_ids, flat_ids = _slot_ids(t)
        w_cat = w_cat[:t.total_rank].to(torch.float32)  # the rows the kernel reads
        f, unscale = _pow2_per_slot(w_cat.abs().amax(dim=1), row_ids, len(t.slot_info))
        w_cat = w_cat * f[row_ids][:, None]
        unscale = unscale[flat_ids]
    # 32-row tiles: no register spills on sm_90 (64-row tiles spilled 12 bytes per thread with dropout)
    BM, BR, BK = (16, 16, 64) if _small() else (32, 32, 64)
    tiles = t.tiles(BM)
    thr, inv = _tables_extra(t)
    lo, hi = _seed_words(seed)
    grid = (tiles.shape[0], _tk.cdiv(t.max_rank, BR))
    with _tk.on_device(x):
        _seg_shrink_kernel[grid](x, w_cat, out, tiles, t.seg, t.slot, thr, inv, t.slot_scale,
                                 x.shape[1], x.stride(0), x.stride(1), lo, hi,
                                 DROPOUT=bool(dropout and t._segs.any_dropout), SCALED=bool(scaled),
                                 TC=x.dtype != torch.float32, BM=BM, BR=BR, BK=BK)
    if unscale is not None:
        out.mul_(unscale)
    return out


def _grad_splits(t, N, BM, BR, BN, device) -> int:
    """Into how many parts ``_seg_grad_kernel`` splits each slot's row blocks. A program reduces a slot's rows for one
    (column block, rank block); at 8192 x 4096 with ranks 8 / 16 / 32 / 64 that is 320 programs, under 3 per SM on
    an H100, each walking 2,048 rows one 32-row block at a time. The H100 profile (benchmarks/RESULTS.md, twelfth
    session) had the kernel at 82 us a call against ~22 us to read its 64 MiB operand: latency, not bandwidth. So,
    as the single-adapter streaming kernels do (``split_count``), the rows are split until there are about 4
    programs per SM (at most one split per row block of the longest slot), the parts adding into the zeroed G."""
    from lorafusion.backends.triton_backend import _num_sms

    programs = _tk.cdiv(N, BN) * sum(_tk.cdiv(info[0], BR) for info in t.slot_info)
    row_blocks = max((_tk.cdiv(info[5], BM) for info in t.slot_info), default=1)
    return _tk.split_count(programs, row_blocks, _num_sms(device))


def grad(l_flat, m, t, seed, dropout, scaled):
    t.check_operands("multi-adapter grad", m.device, rows=m.shape[0], flat=l_flat.numel())
    l_flat = l_flat.contiguous()
    N = m.shape[1]
    G = torch.zeros(t.total_rank, N, dtype=torch.float32, device=m.device)
    if t.num_segments == 0:
        return G
    unscale = None
    if m.dtype == torch.float16:  # L (dS, or S) is rounded to fp16 in the kernel: keep a tiny dS's bits
        row_ids, flat_ids = _slot_ids(t)
        l_flat = l_flat[:t.s_numel].to(torch.float32)  # the elements the kernel reads
        f, unscale = _pow2_per_slot(l_flat, flat_ids, len(t.slot_info))
        l_flat = l_flat * f[flat_ids]
        unscale = unscale[row_ids][:, None]
    # 32 rows per step: no register spills on sm_90 (64 rows spilled 432-612 bytes per thread in bf16)
    BM, BR, BN = (16, 16, 64) if _small() else (32, 32, 64)
    thr, inv = _tables_extra(t)
    lo, hi = _seed_words(seed)
    splits = _grad_splits(t, N, BM, BR, BN, m.device)
    grid = (len(t.slot_info), _tk.cdiv(N, BN), _tk.cdiv(t.max_rank, BR) * splits)
    with _tk.on_device(m):
        _seg_grad_kernel[grid](l_flat, m, G, t.seg, t.slot, t.slot_seg_ptr, t.slot_seg_idx, thr, inv, t.slot_scale,
                               N, m.stride(0), m.stride(1), lo, hi, splits,
                               DROPOUT=bool(dropout and t._segs.any_dropout), SCALED=bool(scaled),
                               TC=m.dtype != torch.float32, ATOMIC=splits > 1, BM=BM, BR=BR, BN=BN)
    if unscale is not None:
        G.mul_(unscale)
    return G


def segmented_gemm(a, weight, bias, l_flat, wc, t, seed, dropout, scaled, transpose_w):
    """Out = a W^T (transpose_w) or a W, + bias, + the segmented rank-r term (see module docstring)."""
    t.check_operands("multi-adapter GEMM", a.device, rows=a.shape[0], w_rows=wc.shape[0], flat=l_flat.numel())
    l_flat, wc = l_flat.contiguous(), wc.contiguous()  # dense rows, as the kernel indexes them
    bias = bias.contiguous() if bias is not None else None  # loaded at bias_ptr + col
    M, K = a.shape
    N = weight.shape[0] if transpose_w else weight.shape[1]
    if (weight.shape[1] if transpose_w else weight.shape[0]) != K or wc.shape[1] != N or (
            bias is not None and bias.numel() != N):
        raise ValueError(f"multi-adapter GEMM: input {tuple(a.shape)}, weight {tuple(weight.shape)}"
                         f"{'^T' if transpose_w else ''}, adapter factor {tuple(wc.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not chain")
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0:
        return out
    blo, bhi = t.block_lookup(LOOKUP_M)
    if transpose_w:  # element (k, n) = W[n, k]
        swk, swn = weight.stride(1), weight.stride(0)
    else:
        swk, swn = weight.stride(0), weight.stride(1)
    thr, inv = _tables_extra(t)
    lo, hi = _seed_words(seed)

    def grid(meta):
        return (_tk.cdiv(M, meta["BM"]) * _tk.cdiv(N, meta["BN"]),)

    with _tk.on_device(out):
        _tk.launch(_seg_gemm_kernel, grid, a, weight, bias if bias is not None else out, l_flat, wc, out, blo, bhi,
                   t.seg, t.slot, thr, inv, t.slot_scale,
                   M, N, K, _tk.next_pow2(M), a.stride(0), a.stride(1), swk, swn, out.stride(0),
                   lo, hi, HAS_BIAS=bias is not None, DROPOUT=bool(dropout and t._segs.any_dropout),
                   SCALED=bool(scaled), IEEE=a.dtype == torch.float32, LOOKUP=LOOKUP_M)
    return out


def segmented_term(a, bias, l_flat, wc, t, seed, dropout, scaled):
    """Out (rows of ``a`` x columns of ``wc``, ``a``'s dtype) = bias + the segmented rank-r term alone: the GEMM
    kernel above over an empty reduction (K = 0), so its epilogue code, masks and tiling are the fused GEMM's. The
    ``blas`` GEMM placement (``lorafusion.multi.backends``) then lets torch's GEMM (cuBLAS) add ``a`` W^T / ``a`` W
    on top (beta = 1). ``a`` supplies the row count, dtype and device; its values are not read."""
    no_k = a[:, :0]  # K = 0: the kernel's main loop runs no step and never loads a or the weight
    return segmented_gemm(no_k, wc.t()[:, :0], bias, l_flat, wc, t, seed, dropout, scaled, True)


def expand_add_(out, l_flat, w_cat, t, seed, dropout, scaled):  # not used by the Triton backend (GEMM epilogue)
    from lorafusion.multi import torch_ops

    return torch_ops.expand_add_(out, l_flat, w_cat, t, seed, dropout, scaled)
