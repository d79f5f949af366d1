"""``lorafusion plan --jobs jobs.yaml -o schedule.json``: plan, verify, and print the plan's metrics beside the
baselines (``python -m scheduling plan ...`` does the same). ``--verify schedule.json`` checks a schedule instead
(one written by -o, or edited by hand) and prints its violations, or its metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .baselines import mlora_like, sequential_ffd
from .bounds import min_padding
from .jobs import PlanParams, load_jobs
from .planner import plan
from .simulate import SimResult, simulate, simulate_flushed
from .schedule import Schedule
from .verify import check, verify


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafusion plan", description="Pack many LoRA jobs' samples into microbatches "
                                "for one shared pipeline and write the schedule as JSON.")
    p.add_argument("--jobs", required=True, help="jobs file (YAML or JSON); see benchmarks/jobs_example.yaml")
    p.add_argument("-o", "--output", help="where to write the schedule JSON (default: not written)")
    p.add_argument("--capacity", type=int, help="token capacity per microbatch (overrides the jobs file)")
    p.add_argument("--pad-multiple", type=int, help="padding multiple per adapter segment (128 on GPU, 1 on CPU)")
    p.add_argument("--stages", type=int, help="pipeline stages")
    p.add_argument("--seed", type=int, help="seed for lengths sampled from a distribution, recorded in the schedule "
                   "(default: the file's, else 0); the search itself is deterministic")
    p.add_argument("--milp-time-limit", type=float, default=0.0,
                   help="seconds per packing unit for the exact MILP packer (HiGHS), whose answer is used only when "
                        "it is proven optimal within the limit (default 0: off, and the plan is reproducible; a "
                        "wall-clock limit can make a plan depend on the machine's load)")
    p.add_argument("--no-baselines", action="store_true", help="skip simulating the baselines")
    p.add_argument("--least-padding", action="store_true",
                   help="also print the least padding any schedule of these jobs must pay (each global batch split "
                        "into segments in the best way, found by HiGHS; scheduling.bounds.min_padding), beside the "
                        "plan's")
    p.add_argument("--metrics-json", help="also write the metrics table as JSON here")
    p.add_argument("--verify", metavar="SCHEDULE_JSON",
                   help="instead of planning, check this schedule (written by -o, or by hand) against the jobs and "
                        "every packing rule: print each violation and exit 1, or print its metrics beside the "
                        "baselines; capacity / padding multiple / stages default to the schedule's own where "
                        "neither the flags nor the jobs file set them")
    return p


def _row(name: str, r: SimResult, plan_time: float | None) -> str:
    speed = f"{r.time / plan_time:7.3f}x" if plan_time else "       -"
    return (f"{name:<22} {r.time:>12.0f} {speed} {r.bubble_fraction:8.3f} {r.padding_fraction:8.4f} "
            f"{r.num_microbatches:6d} {r.num_noops:6d} {r.token_cv:7.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        for flag, path in (("-o/--output", args.output), ("--metrics-json", args.metrics_json)):
            if path:  # fail before planning, not after it
                parent = Path(path).resolve().parent
                if not parent.is_dir():
                    raise ValueError(f"{flag} {path!r}: folder {str(parent)!r} does not exist")
                if Path(path).is_dir():
                    raise ValueError(f"{flag} {path!r} is a folder, not a file")
        if args.seed is not None and args.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
        given = None
        if args.verify:
            if args.output:
                raise ValueError("--verify checks a schedule and writes none: drop -o/--output")
            try:
                given = Schedule.load(args.verify)
            except OSError as e:
                raise ValueError(f"--verify {args.verify!r}: cannot read it: {e.strerror or e}") from e
            except ValueError as e:  # not JSON, or not a schedule
                raise ValueError(f"--verify {args.verify!r}: {e}") from e
        jobs, settings = load_jobs(args.jobs, seed=args.seed)
        own = {"capacity": given.capacity, "pad_multiple": given.pad_multiple, "stages": given.stages} if given \
            else {"pad_multiple": 1, "stages": 4}
        capacity = args.capacity if args.capacity is not None else settings.get("capacity", own.get("capacity"))
        if capacity is None:
            raise ValueError("capacity is not set: pass --capacity or put 'capacity:' in the jobs file")
        pad = args.pad_multiple if args.pad_multiple is not None else settings.get("pad_multiple",
                                                                                   own["pad_multiple"])
        stages = args.stages if args.stages is not None else settings.get("stages", own["stages"])
        seed = args.seed if args.seed is not None else settings.get("seed", 0)
        params = PlanParams(capacity, pad, stages)
        t0 = time.perf_counter()
        if given is not None:
            violations = verify(given, jobs, params)
            if violations:
                print(f"{args.verify}: {len(violations)} violation(s) of the packing rules:")
                for v in violations:
                    print(f"  {v}")
                return 1
            schedule = given
        else:
            schedule = plan(jobs, params, seed=seed, milp_time_limit=args.milp_time_limit)
            check(schedule, jobs, params)
        seconds = time.perf_counter() - t0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        try:
            schedule.save(args.output)
        except OSError as e:
            print(f"error: cannot write the schedule to {args.output!r}: {e}", file=sys.stderr)
            return 2
    ours = simulate(schedule)
    rows = {"plan" if given is None else "schedule": ours}
    if not args.no_baselines:
        rows["a: sequential FFD"] = simulate_flushed(sequential_ffd(jobs, params))
        rows["b: mLoRA-like"] = simulate(mlora_like(jobs, params))
    head = f"{len(jobs)} jobs, capacity {params.capacity}, padding multiple {params.pad_multiple}, {params.stages} stages; "
    if given is None:
        print(head + f"planned in {seconds:.2f} s (groups {schedule.meta['groups']}, target "
                     f"{schedule.meta['target_tokens']} tokens)")
    else:
        print(head + f"{args.verify} verifies: every sample once, capacity, padding, dependencies, optimizer steps")
    print(f"{'schedule':<22} {'sim time':>12} {'speedup':>8} {'bubble':>8} {'padding':>8} {'mbs':>6} "
          f"{'no-ops':>6} {'tok cv':>7}")
    for i, (name, r) in enumerate(rows.items()):
        print(_row(name, r, ours.time if i and ours.time else None))
    extra = {}
    if args.least_padding:
        least = min_padding(jobs, params)
        paid = ours.padded_tokens - ours.real_tokens
        extra["least_padding"] = {"tokens": least.tokens, "proven_exact": least.proven, "plan_tokens": paid}
        print(f"padding: the plan pays {paid} tokens ({ours.padding_fraction:.2%}); no schedule of these jobs pays "
              f"fewer than {least.tokens} ({least.tokens / max(1, ours.real_tokens + least.tokens):.2%}"
              f"{'' if least.proven else ', a lower bound not proven the least: a split sample or a solve cut short'})")
    if args.output:
        print(f"schedule written to {args.output}")
    if args.metrics_json:
        try:
            with open(args.metrics_json, "w") as f:
                json.dump({**({"planning_seconds": seconds} if given is None else {"verified": args.verify}),
                           **{k: v.to_dict() for k, v in rows.items()}, **extra}, f,
                          indent=2)
        except OSError as e:
            print(f"error: cannot write the metrics to {args.metrics_json!r}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
