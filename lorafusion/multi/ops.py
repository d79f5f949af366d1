"""The C++ / CUDA segmented ops (``torch.ops.lorafusion.multi_lora_*``, csrc/multi_lora.cpp and .cu) and their fake
implementations for ``torch.compile``.

The ops ship inside the package extension ``lorafusion._C`` (setup.py compiles every csrc/*.cpp / *.cu into it).
For development without the package build, ``LORAFUSION_MULTI_JIT=1`` compiles every csrc/*.cpp on first use with
``torch.utils.cpp_extension.load`` (build folder: $LORAFUSION_MULTI_JIT_DIR or /tmp/multi_dev_build) and stands the
result in for ``lorafusion._C``; import ``lorafusion.multi.ops`` (or call ``cpp_ops_reason()``) before anything else
imports ``lorafusion._C``.
"""
from __future__ import annotations

import logging
import os

import torch

from lorafusion.reference import op_seed

logger = logging.getLogger("lorafusion")
_OP_NAMES = ("multi_lora_shrink", "multi_lora_grad", "multi_lora_expand_add_", "multi_lora_grad_a_expand_dx_")
_state: dict[str, object] = {}


def _registered() -> bool:
    return all(hasattr(torch.ops.lorafusion, n) for n in _OP_NAMES) if hasattr(torch.ops, "lorafusion") else False


def _try_load() -> str | None:
    """None when the ops are registered, else the reason they are not."""
    if os.environ.get("LORAFUSION_MULTI_JIT") == "1":
        # development without the package build: compile every csrc/*.cpp (as setup.py does) into a dev library
        # and stand it in for lorafusion._C, so the single-adapter backends see the same ops.
        import glob
        import sys
        import types

        from torch.utils import cpp_extension

        if "lorafusion._C" in sys.modules:
            return "LORAFUSION_MULTI_JIT=1 but lorafusion._C was already imported (its ops would clash)"
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))
        build = os.environ.get("LORAFUSION_MULTI_JIT_DIR", "/tmp/multi_dev_build")
        os.makedirs(build, exist_ok=True)
        sources = sorted(glob.glob(os.path.join(root, "*.cpp")))
        if torch.version.cuda and torch.cuda.is_available():  # this file's CUDA kernels (not the whole csrc/*.cu)
            sources.append(os.path.join(root, "multi_lora_cuda.cu"))
        common = dict(build_directory=build, extra_include_paths=[root], extra_cflags=["-O3", "-fno-trapping-math"],
                      extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"], is_python_module=False, verbose=False)
        try:
            cpp_extension.load(name="lorafusion_dev_all", sources=sources, **common)
            sys.modules["lorafusion._C"] = types.ModuleType("lorafusion._C")
        except Exception as exc:  # another csrc file is broken mid-edit: build the multi-adapter ops alone
            logger.warning("lorafusion.multi: JIT build of all csrc failed (%s); building multi_lora alone",
                           str(exc).splitlines()[0][:200])
            mine = [x for x in sources if os.path.basename(x).startswith("multi_lora")]
            cpp_extension.load(name="lorafusion_multi_dev", sources=mine, **common)
        return None if _registered() else "the JIT build registered no multi_lora ops"
    try:
        import lorafusion._C  # noqa: F401  (registers every op of csrc/)
    except Exception as exc:  # extension not built
        return f"lorafusion._C not importable ({exc})"
    if _registered():
        return None
    return "lorafusion._C has no multi_lora ops (built before csrc/multi_lora.cpp existed? rebuild the package)"


def cpp_ops_reason() -> str | None:
    """None when the C++ ops are usable, else why not (checked once)."""
    if "reason" not in _state:
        try:
            _state["reason"] = _try_load()
        except Exception as exc:
            _state["reason"] = f"loading the multi_lora ops failed: {exc}"
        if _state["reason"] is None:
            _register_fakes()
    return _state["reason"]  # type: ignore[return-value]


def cuda_ops_available() -> bool:
    """True when the multi_lora ops have CUDA kernels registered (csrc/multi_lora_cuda.cu was compiled)."""
    if cpp_ops_reason() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("lorafusion::multi_lora_shrink", "CUDA")


def _register_fakes() -> None:
    if _state.get("fakes"):
        return
    _state["fakes"] = True
    lib = torch.library

    def shrink_fake(x, w_cat, seg, slot, slot_p, slot_scale, numel, seed, dropout, scaled):
        return x.new_empty((numel,), dtype=torch.float32)

    def grad_fake(l_flat, m, seg, slot, slot_p, slot_scale, total_rank, seed, dropout, scaled):
        return m.new_empty((total_rank, m.shape[1]), dtype=torch.float32)

    def expand_fake(out, l_flat, w_cat, seg, slot, slot_p, slot_scale, seed, dropout, scaled):
        return None

    def grad_a_dx_fake(dx, ds_flat, x, a_cat, seg, slot, slot_p, slot_scale, total_rank, seed, dropout,
                       accumulate=True):
        return x.new_empty((total_rank, x.shape[1]), dtype=torch.float32)

    for name, fn in (("multi_lora_shrink", shrink_fake), ("multi_lora_grad", grad_fake),
                     ("multi_lora_expand_add_", expand_fake), ("multi_lora_grad_a_expand_dx_", grad_a_dx_fake)):
        try:
            lib.register_fake(f"lorafusion::{name}")(fn)
        except RuntimeError as exc:  # already registered (module reloaded)
            logger.debug("fake for %s not registered: %s", name, exc)


# The primitives over a layout's device tables (same signatures as lorafusion.multi.torch_ops). The ops take the
# seed as int64: a uint64 seed above 2**63 - 1 goes in as its two's complement (the kernels read it back as uint64).


def shrink(x, w_cat, t, seed, dropout, scaled):
    t.check_operands("multi_lora_shrink", x.device, rows=x.shape[0], w_rows=w_cat.shape[0])
    if x.dim() != 2 or w_cat.dim() != 2 or x.shape[1] != w_cat.shape[1]:
        raise ValueError(f"multi_lora_shrink: x {tuple(x.shape)} and stacked A {tuple(w_cat.shape)} must be "
                         "(T x K) and (R x K)")
    return torch.ops.lorafusion.multi_lora_shrink(x, w_cat, t.seg, t.slot, t.slot_p, t.slot_scale, t.s_numel,
                                                  op_seed(seed), dropout, scaled)


def grad(l_flat, m, t, seed, dropout, scaled):
    t.check_operands("multi_lora_grad", m.device, rows=m.shape[0], flat=l_flat.numel())
    return torch.ops.lorafusion.multi_lora_grad(l_flat, m, t.seg, t.slot, t.slot_p, t.slot_scale, t.total_rank,
                                                op_seed(seed), dropout, scaled)


def expand_add_(out, l_flat, w_cat, t, seed, dropout, scaled):
    t.check_operands("multi_lora_expand_add_", out.device, rows=out.shape[0], w_rows=w_cat.shape[0],
                     flat=l_flat.numel())
    if out.dim() != 2 or w_cat.dim() != 2 or out.shape[1] != w_cat.shape[1]:
        raise ValueError(f"multi_lora_expand_add_: out {tuple(out.shape)} and stacked B^T {tuple(w_cat.shape)} "
                         "must be (T x N) and (R x N)")
    torch.ops.lorafusion.multi_lora_expand_add_(out, l_flat, w_cat, t.seg, t.slot, t.slot_p, t.slot_scale,
                                                op_seed(seed), dropout, scaled)
    return out


def grad_a_expand_dx_(dx, ds_flat, x, a_cat, t, seed, dropout, accumulate=True):
    """CPU: dA = dS^T D(X) and dx += D'(dS A) in one pass over the mask (returns dA_cat). ``accumulate=False``
    stores the term instead (rows of no adapter zeroed)."""
    t.check_operands("multi_lora_grad_a_expand_dx_", x.device, rows=x.shape[0], w_rows=a_cat.shape[0],
                     flat=ds_flat.numel())
    if dx.shape != x.shape or a_cat.dim() != 2 or a_cat.shape[1] != x.shape[1]:
        raise ValueError(f"multi_lora_grad_a_expand_dx_: dx {tuple(dx.shape)}, x {tuple(x.shape)} and stacked A "
                         f"{tuple(a_cat.shape)} must be (T x K), (T x K) and (R x K)")
    return torch.ops.lorafusion.multi_lora_grad_a_expand_dx_(dx, ds_flat, x, a_cat, t.seg, t.slot, t.slot_p,
                                                             t.slot_scale, t.total_rank, op_seed(seed), dropout,
                                                             accumulate)
