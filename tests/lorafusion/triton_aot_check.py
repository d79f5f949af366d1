"""Compile every Triton kernel of lorafusion for a GPU architecture on a machine that has no GPU.

The interpreter tests (``TRITON_INTERPRET=1``) check the kernels' math on CPU tensors, but the interpreter never runs
Triton's compiler: a kernel can pass them and still fail to compile for a real GPU (a ``tl.dot`` shape or dtype the
hardware path rejects, a bf16 lowering, a layout conversion), or compile to a program whose shared memory does not
fit the device, which fails only at launch. This check drives the real launch paths of the Triton backends
(``lorafusion.backends.triton_backend`` and the multi-adapter ``lorafusion.multi.triton_kernels``) on CPU tensors,
with Triton's driver replaced by a compile-only one that targets the chosen architecture: every kernel the launch
would run, in every autotune config that survives the backend's own pruning (the CI subset: every config at the
issues' benchmark shapes in bf16, the largest-footprint config elsewhere), goes through Triton's full pipeline
(TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) and is recorded with the shared memory it needs. Nothing is
launched and no result is computed, so the outputs are not checked here: that is what the interpreter tests and,
on a GPU, ``benchmarks/gpu_check.sh`` do.

    python tests/lorafusion/triton_aot_check.py                  # sm_90 (H100/H200), the CI subset
    python tests/lorafusion/triton_aot_check.py --full --arch 80 --smem-optin 166912   # every case, A100

Exit status 0 when every kernel compiled and fits; 1 otherwise, with the failures listed. ``--json`` writes the table.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # the compiled path: must be unset before triton is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime._async_compile import AsyncCompileMode, FutureKernel  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory per block (opt-in) and SM count of the targets we build for: H100/H200 (sm_90), A100 (sm_80).
DEVICE_DEFAULTS = {90: (232448, 132), 80: (166912, 108), 89: (101376, 128)}


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports the target architecture and device 0, launches nothing."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing can be benchmarked")


def _footprint(config) -> int:
    """A config's tile volume times its pipeline depth: the order of its shared-memory and register needs."""
    size = config.num_stages or 1
    for k, v in config.kwargs.items():
        if k.startswith("BLOCK") and isinstance(v, int):
            size *= v
    return size


class Recorder:
    """Patches Triton so that a launch compiles (warmup) instead of running, and an autotuned launch compiles every
    config that the kernel's pruning keeps (or, with ``every_config`` off, only the one of the largest footprint, the
    likeliest to overflow shared memory or spill); records each compiled kernel."""

    def __init__(self):
        self.compiled: list[dict] = []
        self.pending: list[tuple] = []  # (case, kernel name, constexprs, compiled or future kernel)
        self.failures: list[str] = []
        self.case = ""
        self.every_config = True
        self._saved = None

    def __enter__(self):
        rec = self
        jit_run, tune_run = JITFunction.run, Autotuner.run

        def compile_only(self, *args, grid, warmup, **kwargs):
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (bool, int))}
            rec.pending.append((rec.case, self.fn.__name__, consts, kernel))
            return kernel

        def every_config(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            if not rec.every_config:
                configs = [max(configs, key=_footprint)]
            for config in configs:
                if config.pre_hook is not None:  # e.g. the TMA kernels set their descriptors' tile shapes
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            self.nargs = None

        JITFunction.run, Autotuner.run = compile_only, every_config
        self._saved = (jit_run, tune_run)
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._saved

    def collect(self) -> None:
        """Wait for every compilation (they may run in a thread pool) and record it, or its failure."""
        for case, name, consts, kernel in self.pending:
            try:
                if isinstance(kernel, FutureKernel):
                    kernel = kernel.result()  # raises the compiler's own error
                meta = kernel.metadata
            except Exception:  # noqa: BLE001 - every failure is reported, with its traceback
                self.failures.append(f"{case}: {name} {consts}:\n{traceback.format_exc()}")
                continue
            self.compiled.append({"case": case, "kernel": name, "num_warps": meta.num_warps,
                                  "num_stages": meta.num_stages, "shared": int(meta.shared), "constexprs": consts,
                                  "ptx": kernel.asm.get("ptx")})
            ptx = self.compiled[-1]["ptx"] or ""
            # which tensor-core path the matrix products took: Hopper's asynchronous warpgroup MMA, or mma.sync
            self.compiled[-1]["wgmma"] = ptx.count("wgmma.mma_async")
            self.compiled[-1]["mma_sync"] = ptx.count("mma.sync")
            # static instruction counts of the PTX (loops unrolled per tile): Philox's 32-bit high multiplies, and
            # shared-memory traffic other than the pipelined operand copies (layout conversions, reductions)
            self.compiled[-1]["mul_hi"] = len(re.findall(r"\bmul\.hi\.u32\b", ptx))
            self.compiled[-1]["ld_st_shared"] = len(re.findall(r"\b(?:ld|st)\.shared\b", ptx))
        self.pending = []


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(entries: list[dict], arch: int, jobs: int, cases: str | None = None) -> None:
    """Registers per thread and spill bytes of each compiled kernel, from ``ptxas -v`` (the ptxas Triton uses) on its
    PTX; added to the entries as ``registers`` / ``spill_stores`` / ``spill_loads``. ``cases``: a regular expression;
    only the entries whose case name it matches are measured (ptxas runs even when Triton's cache is warm)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    exe, gpu = get_ptxas(arch).path, sm_arch_from_capability(arch)

    def one(entry: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(entry["ptx"])
            # the flags Triton 3.9 passes (fp fusion on, its ptxas 13 register-allocation workaround)
            cmd = [exe, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                   "-o", os.path.join(d, "k.cubin")]
            log = subprocess.run(cmd,
                                 capture_output=True, text=True, check=True).stderr
        regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
        entry["registers"] = int(regs.group(1)) if regs else None
        entry["spill_stores"], entry["spill_loads"] = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [e for e in entries if e.get("ptx") and (cases is None or re.search(cases, e["case"]))]))


def _single_cases(full: bool):
    """(name, dtype, tokens, in, out, rank, p, bias, need_dx)"""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    # CI compiles fp16 on the two small cases only (its GEMM configs are bf16's); --full adds it at the big shape
    big = dtypes if full else (torch.bfloat16, torch.float32)
    cases = [(f"8192x4096->4096 r16 p0.1 {dt}", dt, 8192, 4096, 4096, 16, 0.1, True, True) for dt in big]
    cases += [
        ("8192x4096->14336 r64 p0 bf16 nobias", torch.bfloat16, 8192, 4096, 14336, 64, 0.0, False, True),
        ("133x100->300 r7 p0.1 bf16 (odd sizes)", torch.bfloat16, 133, 100, 300, 7, 0.1, True, True),
        ("1x4096->4096 r256 p0.1 bf16 (one token, largest rank)", torch.bfloat16, 1, 4096, 4096, 256, 0.1, True,
         True),
    ]
    # the TMA GEMMs (LORAFUSION_TRITON_TMA=1): the benchmark shape and an edge-tile one
    cases += [(f"TMA 8192x4096->4096 r16 p0.1 {dt}", dt, 8192, 4096, 4096, 16, 0.1, True, True)
              for dt in ((torch.bfloat16, torch.float16) if full else (torch.bfloat16,))]
    cases.append(("TMA 133x96->40 r16 p0.1 torch.float16", torch.float16, 133, 96, 40, 16, 0.1, True, True))
    if full:
        cases += [(f"{T}x{k}->{n} r{r} p{p} {dt}", dt, T, k, n, r, p, True, True)
                  for dt in dtypes for (T, k, n, r, p) in ((16384, 4096, 4096, 16, 0.1), (8192, 14336, 4096, 16, 0.1),
                                                           (4096, 8192, 8192, 64, 0.1), (100, 64, 80, 1, 0.0),
                                                           (1000, 1000, 1000, 128, 0.1))]
        cases.append(("2048x1024->1024 r16 p0.1 bf16 no dX", torch.bfloat16, 2048, 1024, 1024, 16, 0.1, True, False))
    return cases


# the issues' benchmark shapes in bf16 (not TMA, an opt-in path): every autotune config is compiled for these; the
# other cases compile one config per launch unless --full
EVERY_CONFIG = re.compile(r"^(single 8192x4096->4096 r16|multi 8192 tokens).*bfloat16$")


def run_single(cases, rec: Recorder, full: bool = True) -> list[str]:
    from lorafusion.backends import triton_backend as tb

    failures = []
    if cases:
        rec.case = "single philox_uint32"
        try:
            tb.philox_uint32(1234, 64, 64, "cpu")
        except Exception:  # noqa: BLE001
            failures.append(f"{rec.case}:\n{traceback.format_exc()}")
    for name, dtype, T, fin, fout, r, p, bias, need_dx in cases:
        rec.case = "single " + name
        rec.every_config = full or bool(EVERY_CONFIG.search(rec.case))
        os.environ["LORAFUSION_TRITON_TMA"] = "1" if name.startswith("TMA ") else "0"
        x = torch.empty(T, fin, dtype=dtype)
        W = torch.empty(fout, fin, dtype=dtype)
        b = torch.empty(fout, dtype=dtype) if bias else None
        A = torch.empty(r, fin, dtype=dtype)
        B = torch.empty(fout, r, dtype=dtype)
        dy = torch.empty(T, fout, dtype=dtype)
        try:
            _, S = tb.forward(x, W, b, A, B, 2.0, 1234, p)
            tb.backward(dy, x, W, A, B, S, 2.0, 1234, p, need_dx)
            if p > 0 and T > 1:  # the standalone ops: the dX GEMM with the mask from its own kernel
                tb.lora_expand_backward(dy, W, S, A, 1234, p)
            # LORAFUSION_TRITON_GEMM=blas: the stored terms alone (the GEMM kernels over an empty reduction); the
            # torch GEMMs that add onto them would run for real on these CPU tensors, so they are left out
            tb.lora_expand_forward(x[:, :0], W[:, :0], b, S, B, 2.0)
            bits = torch.empty(T, fin, dtype=torch.int8) if p > 0 else None
            tb._expand_backward(dy[:, :0], W[:0], S, A, bits, p)
        except Exception:  # noqa: BLE001 - every failure is reported, with its traceback
            failures.append(f"{rec.case}:\n{traceback.format_exc()}")
    os.environ.pop("LORAFUSION_TRITON_TMA", None)
    return failures


def _multi_cases(full: bool):
    """(name, dtype, tokens, in, out, ranks, p)"""
    cases = [(f"8192 tokens 4096->4096 ranks 8/16/32/64 p0.1 {dt}", dt, 8192, 4096, 4096, (8, 16, 32, 64), 0.1)
             for dt in (torch.bfloat16, torch.float32)]
    cases.append(("133 tokens 100->300 ranks 1/7/256 p0 fp16", torch.float16, 133, 100, 300, (1, 7, 256), 0.0))
    if full:
        cases += [("4096 tokens 4096->14336 16 adapters p0.1 bf16", torch.bfloat16, 4096, 4096, 14336,
                   tuple([8, 16, 32, 64] * 4), 0.1),
                  ("1000 tokens 1000->1000 ranks 3/100 p0.1 fp16", torch.float16, 1000, 1000, 1000, (3, 100), 0.1)]
    return cases


def run_multi(cases, rec: Recorder, full: bool = True) -> list[str]:
    from lorafusion.multi import AdapterSegments, AdapterSpec
    from lorafusion.multi import triton_kernels as mt
    from lorafusion.multi.backends import SegmentedBackend

    backend = SegmentedBackend("triton", mt, mt.segmented_gemm)
    failures = []
    for name, dtype, T, fin, fout, ranks, p in cases:
        rec.case = "multi " + name
        rec.every_config = full or bool(EVERY_CONFIG.search(rec.case))
        specs = {f"a{i}": AdapterSpec(r, 2.0 * r, p) for i, r in enumerate(ranks)}
        ids = [i * len(ranks) // T for i in range(T)] if T >= len(ranks) else list(range(T))
        try:
            t = AdapterSegments(ids, specs).tables("cpu")
            total = sum(ranks)
            x = torch.empty(T, fin, dtype=dtype)
            W = torch.empty(fout, fin, dtype=dtype)
            b = torch.empty(fout, dtype=dtype)
            A_cat = torch.empty(total, fin, dtype=torch.float32)
            Bt_cat = torch.empty(total, fout, dtype=torch.float32)
            dy = torch.empty(T, fout, dtype=dtype)
            _, S = backend.forward(x, W, b, A_cat, Bt_cat, t, 1234, True)
            backend.backward(dy, x, W, A_cat, Bt_cat, S, t, 1234, True, True)
            # LORAFUSION_TRITON_GEMM=blas: the stored terms alone (the GEMM kernel over K = 0); torch's GEMM that
            # adds onto them would run for real on these CPU tensors, so it is left out
            mt.segmented_term(x, b, S, Bt_cat, t, 1234, False, True)
            mt.segmented_term(dy, None, S, A_cat, t, 1234, True, False)
        except Exception:  # noqa: BLE001
            failures.append(f"{rec.case}:\n{traceback.format_exc()}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--smem-optin", type=int, help="shared memory per block, opt-in, in bytes (default: the arch's)")
    ap.add_argument("--sms", type=int, help="SM count for the launchers' split heuristics (default: the arch's)")
    ap.add_argument("--full", action="store_true", help="every case in every config (slower), not only the CI subset")
    ap.add_argument("--only", help="only the cases whose name contains this text")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compilations at a time")
    ap.add_argument("--ptxas-usage", action="store_true",
                    help="also report registers and spills per kernel config (ptxas -v on each kernel's PTX)")
    ap.add_argument("--ptxas-cases", metavar="REGEX",
                    help="with --ptxas-usage: only the cases whose name matches this regular expression")
    ap.add_argument("--json", help="write the compiled-kernel table here")
    args = ap.parse_args(argv)
    optin, sms = DEVICE_DEFAULTS.get(args.arch, (None, None))
    optin = args.smem_optin or optin
    sms = args.sms or sms
    if optin is None or sms is None:
        ap.error(f"--arch {args.arch}: no defaults known; give --smem-optin and --sms")

    from lorafusion.backends import triton_backend as tb
    from lorafusion.backends import triton_kernels as tk
    from lorafusion.multi import triton_kernels as mt

    if tk.INTERPRET or mt.INTERPRET:
        print("TRITON_INTERPRET is set in this process: nothing would be compiled", file=sys.stderr)
        return 2
    # The launchers run on CPU tensors here, sized for the target device.
    tb.DEVICE_TYPES = ("cpu",)
    tb._num_sms = lambda device: sms
    tk._smem_optin[("cpu", None)] = optin - tk._SMEM_RESERVE
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))

    t0 = time.perf_counter()
    # Launches queue their compilations on a thread pool (Triton's async compile mode: the compiler releases the
    # GIL, so this scales with the cores); collect() waits for them inside the mode, so errors keep their traceback.
    with Recorder() as rec, ThreadPoolExecutor(args.jobs) as pool, AsyncCompileMode(pool, ignore_errors=True):
        single = [c for c in _single_cases(args.full) if args.only is None or args.only in "single " + c[0]]
        multi = [c for c in _multi_cases(args.full) if args.only is None or args.only in "multi " + c[0]]
        if not single and not multi:
            ap.error(f"--only {args.only!r} matches no case")
        failures = run_single(single, rec, args.full) + run_multi(multi, rec, args.full)
        rec.collect()
    failures += rec.failures
    secs = time.perf_counter() - t0
    too_big = [c for c in rec.compiled if c["shared"] > optin]
    failures += [f"{c['case']}: {c['kernel']} needs {c['shared']} B of shared memory, more than the {optin} B the "
                 f"device allows (constexprs {c['constexprs']}, {c['num_warps']} warps, {c['num_stages']} stages)"
                 for c in too_big]

    if args.ptxas_usage:
        ptxas_usage(rec.compiled, args.arch, args.jobs, args.ptxas_cases)
    by_kernel: dict[str, list[dict]] = {}
    for c in rec.compiled:
        by_kernel.setdefault(c["kernel"], []).append(c)
    print(f"sm_{args.arch}: {len(rec.compiled)} kernel compilations in {secs:.1f} s, triton {triton.__version__}")
    usage = f" {'max regs':>8} {'configs spilling':>16}" if args.ptxas_usage else ""
    print(f"{'kernel':<26} {'compiled':>8} {'max shared (B)':>15} {'wgmma':>5} {'mma.sync':>8} {'mul.hi':>7}"
          f" {'ld/st.shared':>12}{usage}")
    for name, cs in sorted(by_kernel.items()):
        if args.ptxas_usage:
            measured = [c for c in cs if "registers" in c]
            regs = max((c["registers"] or 0) for c in measured) if measured else "-"
            spilling = sum(1 for c in measured if c["spill_stores"] or c["spill_loads"]) if measured else "-"
            usage = f" {regs:>8} {spilling:>16}"
        wgmma = sum(1 for c in cs if c["wgmma"])  # configs whose products run on each tensor-core path
        mma = sum(1 for c in cs if c["mma_sync"])
        mulhi = max(c["mul_hi"] for c in cs)  # the largest static count over the kernel's configs
        shared_ops = max(c["ld_st_shared"] for c in cs)
        print(f"{name:<26} {len(cs):>8} {max(c['shared'] for c in cs):>15} {wgmma:>5} {mma:>8} {mulhi:>7}"
              f" {shared_ops:>12}{usage}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "smem_optin": optin, "triton": triton.__version__, "seconds": secs,
                       "compiled": [{k: v for k, v in c.items() if k != "ptx"} for c in rec.compiled],
                       "failures": failures}, f, indent=1)
    if failures:
        print(f"\n{len(failures)} FAILURE(S):", file=sys.stderr)
        for f in failures:
            print(f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
