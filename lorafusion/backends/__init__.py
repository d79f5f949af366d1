"""Backend choice for the fused LoRA linear.

A backend is a module exposing two functions over 2-D row-major operands (x2d: T x in, dy2d: T x out; they may
be non-contiguous views), with the math of ``lorafusion.reference``:

    forward(x2d, weight, bias, lora_A, lora_B, scale, seed, p) -> (Y, S)
        Y = X W^T + b + s * D(X) A^T B^T in x's dtype; S = D(X) A^T in float32 (kept for backward).
    backward(dy2d, x2d, weight, lora_A, lora_B, S, scale, seed, p, need_dx) -> (dX or None, dA, dB)
        dA, dB in float32 (the caller casts to the parameters' dtype); dX in dy's dtype.

``bias`` may be None. ``lora_A`` / ``lora_B`` may be in a wider dtype than x (PEFT keeps fp32 adapters over a bf16
base); every backend computes the rank-r path with float32 accumulation.

Backends: ``triton`` (Triton kernels: the two big GEMMs with the rank-r term in the tile), ``cuda`` (C++/CUDA
custom ops + cuBLAS), ``cpu`` (C++ custom ops, per-row-block fusion around torch's GEMM), ``reference`` (plain
torch). Choose with the ``backend=`` argument or ``LORAFUSION_BACKEND``; ``auto`` picks the fastest available for
the device. The choice is logged once per (device type, backend, reason). ``LORAFUSION_TRITON_GEMM=blas`` (or
``use_gemm_placement("blas")``) makes the Triton backends leave the two big GEMMs to torch (cuBLAS), adding onto a
stored rank-r term, instead of their own GEMM kernels (``gemm_placement``).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger("lorafusion")

BACKENDS = ("triton", "cuda", "cpu", "reference")
_ENV = "LORAFUSION_BACKEND"
_logged: set[tuple] = set()
_cache: dict[str, ModuleType | Exception] = {}

_MODULES = {
    "triton": "lorafusion.backends.triton_backend",
    "triton+blas": "lorafusion.backends.triton_blas_backend",  # "triton" under LORAFUSION_TRITON_GEMM=blas
    "cuda": "lorafusion.backends.cuda_backend",
    "cpu": "lorafusion.backends.cpu_backend",
    "reference": "lorafusion.backends.reference_backend",
}

# Where the Triton backends (single- and multi-adapter) run the two big GEMMs: "fused" (their own GEMM kernels with
# the rank-r term added in the tile) or "blas" (a Triton kernel stores [bias +] the rank-r term, then torch's GEMM,
# cuBLAS on a GPU, adds X W^T / dY W onto it with beta = 1: one more write and read of Y and dX, for the vendor GEMM).
GEMM_PLACEMENTS = ("fused", "blas")
_GEMM_ENV = "LORAFUSION_TRITON_GEMM"


def _check_placement(mode: str, source: str) -> str:
    norm = mode.strip().lower() or "fused"
    if norm not in GEMM_PLACEMENTS:
        raise ValueError(f"{source}={mode!r} is not one of {GEMM_PLACEMENTS}")
    return norm


def gemm_placement(placement: str | None = None) -> str:
    """``placement`` if given, else $LORAFUSION_TRITON_GEMM (read on every call; default "fused"); validated."""
    if placement is not None:
        return _check_placement(placement, "placement")
    return _check_placement(os.environ.get(_GEMM_ENV, "fused"), f"${_GEMM_ENV}")


@contextlib.contextmanager
def use_gemm_placement(mode: str):
    """Within the block, layers resolve their Triton backend with GEMM placement ``mode``. It sets
    $LORAFUSION_TRITON_GEMM and restores it after, so it is process-wide (every thread sees it). A layer's backward
    runs with the placement its forward resolved. Under ``torch.compile`` the placement is read when the graph is
    traced and stays fixed in that graph (changing it later does not retrace)."""
    mode = _check_placement(mode, "GEMM placement")
    old = os.environ.get(_GEMM_ENV)
    os.environ[_GEMM_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_GEMM_ENV, None)
        else:
            os.environ[_GEMM_ENV] = old


def _module_key(name: str, placement: str | None = None) -> str:
    """The _MODULES key of backend ``name``: the Triton backend's depends on the GEMM placement."""
    return "triton+blas" if name == "triton" and gemm_placement(placement) == "blas" else name


def _label(key: str) -> str:
    return "triton (GEMM: blas)" if key == "triton+blas" else key


def _load_key(key: str) -> ModuleType | Exception:
    if key not in _cache:
        try:
            mod = importlib.import_module(_MODULES[key])
            reason = getattr(mod, "unavailable_reason", lambda: None)()
            _cache[key] = RuntimeError(reason) if reason else mod
        except Exception as exc:  # an optional dependency missing or a build absent
            _cache[key] = exc
    return _cache[key]


def available_backends() -> dict[str, str]:
    """Map each backend name to 'available' or the reason it is not."""
    out = {}
    for name in BACKENDS:
        try:
            mod = _load_key(_module_key(name))
        except ValueError as exc:  # a bad $LORAFUSION_TRITON_GEMM: the Triton backend only, not the others
            mod = exc
        out[name] = "available" if isinstance(mod, ModuleType) else f"unavailable: {mod}"
    return out


def _supports(mod: ModuleType, device_type: str) -> bool:
    return device_type in getattr(mod, "DEVICE_TYPES", ())


def _log_once(key: tuple, msg: str, *args, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def resolve_backend_name(requested: str | None) -> str:
    """The backend asked for: the argument, else $LORAFUSION_BACKEND, else 'auto'. Validated."""
    name = requested if requested is not None else os.environ.get(_ENV, "auto")
    name = name.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend={name!r} is not one of {BACKENDS + ('auto',)} (argument or ${_ENV})")
    return name


def get_backend(device_type: str, requested: str | None = None, placement: str | None = None) -> ModuleType:
    """The backend module to run on ``device_type`` ('cpu' or 'cuda'). ``placement``: the Triton backend's GEMM
    placement (default: ``gemm_placement()``, from the environment).

    An explicitly requested backend that cannot run raises; 'auto' falls back loudly (one log line)."""
    name = resolve_backend_name(requested)
    if ("available",) not in _logged:  # once per process: which backends exist and why the others do not
        _log_once(("available",), "lorafusion: backends %s", available_backends())
    if name != "auto":
        key = _module_key(name, placement)
        mod = _load_key(key)
        if not isinstance(mod, ModuleType):
            raise RuntimeError(f"backend {name!r} was requested but is unavailable: {mod}")
        if not _supports(mod, device_type):
            raise RuntimeError(f"backend {name!r} was requested but does not run on device type {device_type!r}")
        _log_once((device_type, key, "requested"), "lorafusion: %s backend on %s (requested)", _label(key),
                  device_type)
        return mod
    order = ("triton", "cuda", "reference") if device_type == "cuda" else ("cpu", "reference")
    skipped = []
    for cand in order:
        key = _module_key(cand, placement)
        mod = _load_key(key)
        if isinstance(mod, ModuleType) and _supports(mod, device_type):
            why = "fastest available" if not skipped else "; ".join(skipped)
            # a fallback to a slower backend is a warning (shown without any logging set up), the usual choice info
            _log_once((device_type, key, why), "lorafusion: %s backend on %s (%s)", _label(key), device_type, why,
                      level=logging.WARNING if skipped else logging.INFO)
            return mod
        skipped.append(f"{cand} skipped: {mod if not isinstance(mod, ModuleType) else 'not for ' + device_type}")
    raise RuntimeError(f"no lorafusion backend runs on device type {device_type!r}: {'; '.join(skipped)}")
