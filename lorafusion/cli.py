"""The ``lorafusion`` command: ``train`` (LoRA fine-tuning), ``plan`` (the multi-job planner) and ``cotrain`` (many
jobs' adapters trained together over one base model, following a plan).

    lorafusion train [--config run.yaml] [--resume] [--skip-bad-lines] [--section.key value ...]
    lorafusion plan ...            (see ``lorafusion plan --help``)
    lorafusion cotrain --config cotrain.yaml [--resume]
    lorafusion queue {init,submit,status,cancel,work} --queue Q ...

Exit codes of ``train``: 0 done (or stopped cleanly by SIGINT / SIGTERM after a checkpoint), 2 a bad config, data,
model folder or checkpoint, or an output that cannot be written (one line on stderr naming the problem and where
``--resume`` continues), 130 interrupted before training began or by a second SIGINT (no checkpoint written then),
143 the same for SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

TRAIN_HELP = """\
Fine-tune a causal LM with LoRA.

Every config key can be overridden as --section.key value, e.g.
  lorafusion train --config configs/default.yaml --lora.r 8 --train.max_steps 100 --optimizer.name galore_adamw
Sections: model, data, lora, optimizer (optimizer.galore), batch, train. See docs/training.md.
Without --config the built-in default runs: builtin:tiny-llama on builtin:lowercase.
"""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorafusion train", description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults apply to every key it leaves out)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    args, rest = parser.parse_known_args(argv)

    from lorafusion.train.checkpoint import CheckpointError
    from lorafusion.train.config import ConfigError, load_config, parse_overrides
    from lorafusion.train.data import DataError

    try:
        overrides = parse_overrides(rest)
        if args.skip_bad_lines:
            if not isinstance(overrides.setdefault("data", {}), dict):
                raise ConfigError(f"--data must be a mapping of data keys, got {overrides['data']!r}")
            overrides["data"]["skip_bad_lines"] = True
        cfg = load_config(args.config, overrides)
        from lorafusion.train.trainer import TrainError, run_training
    except ConfigError as exc:
        return _error("train", f"config error: {exc}")
    try:
        with _sigterm_interrupts():
            run_training(cfg, resume=args.resume)
    except ConfigError as exc:
        return _error("train", f"config error: {exc}")
    except DataError as exc:
        return _error("train", f"data error: {exc}")
    except CheckpointError as exc:
        return _error("train", f"checkpoint error: {exc}")
    except TrainError as exc:
        return _error("train", str(exc))
    except OSError as exc:  # an output folder that cannot be made or written, a file named like a folder
        return _error("train", f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM before training began (loading or making the model), or a
        from lorafusion.train.checkpoint import resume_hint  # second signal during it

        return _interrupted("train", exc, resume_hint(cfg.train.output_dir))
    return 0


def _error(command: str, text: str) -> int:
    """One line on stderr for a run that cannot start or go on; exit status 2."""
    print(f"lorafusion {command}: {text}", file=sys.stderr)
    return 2


def _interrupted(command: str, exc: KeyboardInterrupt, where: str) -> int:
    """One line for a Ctrl-C (exit 130) or SIGTERM (``Terminated``, exit 143), saying where a rerun continues."""
    from lorafusion.train.trainer import Terminated

    term = isinstance(exc, Terminated)
    print(f"lorafusion {command}: {'terminated (SIGTERM)' if term else 'interrupted'}; {where}", file=sys.stderr)
    return 143 if term else 130


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises ``Terminated`` until the training loop installs its own handler (which finishes the step
    and checkpoints) and after it restores this one. Without it a SIGTERM while the model loads or the built-in
    model pre-trains killed the process on the spot: no message, and a half-built cache folder left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    from lorafusion.train.trainer import Terminated

    def handle(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _plan(argv: list[str]) -> int:
    try:
        from scheduling.cli import main as plan_main
    except ImportError as exc:
        print(f"lorafusion plan: the planner CLI (scheduling.cli) is not available: {exc}", file=sys.stderr)
        return 2
    rc = plan_main(argv)
    return int(rc or 0)


COTRAIN_HELP = """\
Co-train several jobs' LoRA adapters over one frozen base model: plan their samples into shared microbatches
(scheduling.planner), then train every job's adapter with its own optimizer, one PEFT adapter folder per job.
The config (YAML) lists the jobs; see configs/cotrain_example.yaml and docs/cotrain.md.

Pipeline-parallel: one process per pipeline stage (the config's stages: S), each holding its share of the decoder
layers, e.g.  torchrun --nproc_per_node S -m lorafusion cotrain --config cotrain.yaml
"""


def _cotrain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorafusion cotrain", description=COTRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config: model, output_dir, capacity, ..., jobs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop, checkpointed, once N microbatches of the schedule are done (a time-boxed slot); "
                             "--resume continues")
    args = parser.parse_args(argv)
    from scheduling.pipeline import is_lead, launched, run_pipeline

    if args.stop_after is not None and args.stop_after < 1:  # under torchrun the last stage prints it
        return _error("cotrain", f"--stop-after: must be a positive number of microbatches (got {args.stop_after})") \
            if is_lead() else 2

    from lorafusion.train.checkpoint import CheckpointError, resume_hint
    from lorafusion.train.config import ConfigError

    try:
        from scheduling.executor import CoTrainer, CoTrainError, load_cotrain_config
        from lorafusion.train.trainer import TrainError

        cfg = load_cotrain_config(args.config, {"output_dir": args.output_dir} if args.output_dir else None)
    except ConfigError as exc:  # under torchrun every stage finds it: the last one prints it
        return _error("cotrain", f"config error: {exc}") if is_lead() else 2

    try:
        with _sigterm_interrupts():
            if launched():  # torchrun: one pipeline stage per process
                summary = run_pipeline(cfg, resume=args.resume, stop_after=args.stop_after)
            else:
                summary = CoTrainer(cfg).run(resume=args.resume, stop_after=args.stop_after)
    except ConfigError as exc:
        return 2 if getattr(exc, "quiet", False) else _error("cotrain", f"config error: {exc}")
    except (CoTrainError, CheckpointError, TrainError, ValueError) as exc:
        return 2 if getattr(exc, "quiet", False) else _error("cotrain", str(exc))
    except OSError as exc:
        return _error("cotrain", f"{type(exc).__name__}: {exc}; {resume_hint(cfg.output_dir)}")
    except KeyboardInterrupt as exc:
        if not is_lead():  # every stage got the signal: the last one says so
            from lorafusion.train.trainer import Terminated

            return 143 if isinstance(exc, Terminated) else 130
        return _interrupted("cotrain", exc, resume_hint(cfg.output_dir))
    if not is_lead():  # the last pipeline stage reports
        return 0
    if "stopped" in summary:
        print(f"lorafusion cotrain: stopped ({summary['stopped']}) after microbatch {summary['next_microbatch']}; "
              f"{resume_hint(cfg.output_dir)}")
        return 0
    print(f"lorafusion cotrain: {len(summary['jobs'])} jobs, {summary['microbatches']} microbatches, "
          f"{summary['tokens']} tokens in {summary['train_seconds']:.1f} s; adapters in "
          f"{os.path.join(cfg.output_dir, 'adapters')}")
    for name, j in summary["jobs"].items():
        print(f"  {name}: {j['steps']} steps, loss {j['first_loss']:.4f} -> {j['last_loss']:.4f}")
    stages = summary.get("pipeline", {}).get("peak_memory_mb")
    where = "GPU memory allocated" if cfg.device == "cuda" else "host memory (RSS)"
    print(f"  peak {where}: " + (" / ".join(f"{m:.0f}" for m in stages) + " MiB (stage by stage)" if stages
                                 else f"{summary['peak_memory_mb']:.0f} MiB"))
    return 0


QUEUE_HELP = """\
A multi-tenant job queue over one base model: tenants submit LoRA jobs, a worker co-trains them in fair batches
(lorafusion cotrain's executor) and leaves each job's adapter in its folder. See docs/cotrain.md.

  lorafusion queue init   --queue Q --config queue.yaml
  lorafusion queue submit --queue Q --tenant NAME job.yaml [--priority P]
  lorafusion queue status --queue Q [--json]
  lorafusion queue priority --queue Q JOB_ID --priority P      (a pending job's)
  lorafusion queue cancel --queue Q JOB_ID
  lorafusion queue retry  --queue Q JOB_ID
  lorafusion queue work   --queue Q [--once] [--poll SECONDS]
"""


def _queue(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorafusion queue", description=QUEUE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["init", "submit", "status", "priority", "cancel", "retry", "work"])
    parser.add_argument("target", nargs="?", help="submit: the job file; priority / cancel / retry: the job id")
    parser.add_argument("--queue", required=True, help="the queue's folder")
    parser.add_argument("--config", help="init: the queue's settings (YAML: model, capacity, ..., max_jobs_per_batch)")
    parser.add_argument("--tenant", help="submit: who submits the job")
    parser.add_argument("--priority", type=int, default=None,
                        help="submit (default 0) / priority: -1000 to 1000; a batch takes the highest pending first")
    parser.add_argument("--json", action="store_true", help="status: print every job's state as JSON")
    parser.add_argument("--once", action="store_true", help="work: run one batch at most")
    parser.add_argument("--poll", type=float, default=0.0,
                        help="work: seconds between looks for new jobs once the queue is empty (0: stop then)")
    args = parser.parse_intermixed_args(argv)

    from lorafusion.train.config import ConfigError

    need = {"init": "--config", "submit": "--tenant", "priority": "--priority"}
    if args.action in need and getattr(args, need[args.action][2:]) is None:
        parser.error(f"{args.action} needs {need[args.action]}")
    if args.priority is not None and args.action not in ("submit", "priority"):
        parser.error(f"--priority is for submit and priority, not {args.action}")
    if args.action in ("submit", "priority", "cancel", "retry") and not args.target:
        parser.error(f"{args.action} needs {'the job file' if args.action == 'submit' else 'the job id'}")
    try:
        from scheduling.executor import CoTrainError
        from scheduling.queue import Queue, QueueError

        with _sigterm_interrupts():
            if args.action == "init":
                Queue.init(args.queue, args.config)
                print(f"lorafusion queue: made queue {args.queue}")
                return 0
            q = Queue(args.queue)
            q.settings()  # a folder that is not a queue: one line
            if args.action == "submit":
                print(q.submit(args.tenant, args.target, 0 if args.priority is None else args.priority))
            elif args.action == "priority":
                q.set_priority(args.target, args.priority)
                print(f"lorafusion queue: {args.target} has priority {args.priority}")
            elif args.action == "cancel":
                q.cancel(args.target)
                print(f"lorafusion queue: cancelled {args.target}")
            elif args.action == "retry":
                q.retry(args.target)
                print(f"lorafusion queue: {args.target} is pending again")
            elif args.action == "status":
                jobs = q.jobs()
                if args.json:
                    print(json.dumps(jobs, indent=1))
                else:
                    for j in jobs:
                        extra = j.get("error") or (f"batch {j['batch']}" if j.get("batch") else "")
                        if j.get("priority"):
                            extra = f"priority {j['priority']}  {extra}"
                        print(f"{j['id']}  {j['state']:<9}  {j['tenant']:<12}  {j['name']}  {extra}".rstrip())
                    counts = {st: sum(1 for j in jobs if j["state"] == st) for st in
                              ("pending", "running", "done", "failed", "cancelled", "corrupt")}
                    print("lorafusion queue: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
            else:
                for r in q.work(once=args.once, poll=args.poll):
                    what = (f"failed: {r['failed']}" if "failed" in r else
                            f"stopped ({r['stopped']}); the next worker resumes it" if "stopped" in r else
                            f"done: {', '.join(r['done'])}")
                    print(f"lorafusion queue: batch {r['batch']} {what}")
    except ConfigError as exc:
        return _error("queue", f"config error: {exc}")
    except (QueueError, CoTrainError) as exc:
        return _error("queue", str(exc))
    except OSError as exc:
        return _error("queue", f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt as exc:
        return _interrupted("queue", exc, "a batch left running is resumed by the next worker")
    return 0


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts ``--local_rank=N`` before the subcommand; LOCAL_RANK in the environment is used."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            i += 1
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    commands = {"train": _train, "plan": _plan, "cotrain": _cotrain, "queue": _queue}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lorafusion {train,plan,cotrain,queue} ...\n\n"
              "  train     fine-tune a model with LoRA (lorafusion train --help)\n"
              "  plan      plan many fine-tuning jobs over one base model (lorafusion plan --help)\n"
              "  cotrain   co-train many jobs' adapters over one base model (lorafusion cotrain --help)\n"
              "  queue     a multi-tenant job queue feeding cotrain (lorafusion queue --help)")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"lorafusion: unknown command {argv[0]!r} (choose from train, plan, cotrain, queue)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
