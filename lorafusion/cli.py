"""The ``lorafusion`` command: ``train`` (LoRA fine-tuning), ``plan`` (the multi-job planner) and ``cotrain`` (many
jobs' adapters trained together over one base model, following a plan).

    lorafusion train [--config run.yaml] [--resume] [--skip-bad-lines] [--section.key value ...]
    lorafusion plan ...            (see ``lorafusion plan --help``)
    lorafusion cotrain --config cotrain.yaml [--resume]

Exit codes of ``train``: 0 done (or stopped cleanly by SIGINT / SIGTERM after a checkpoint), 2 a bad config, data,
model folder or checkpoint, or an output that cannot be written (one line on stderr naming the problem and where
``--resume`` continues), 130 interrupted before training began or by a second SIGINT (no checkpoint written then),
143 the same for SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
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
        from lorafusion.train.trainer import Terminated, TrainError, run_training
    except ConfigError as exc:
        print(f"lorafusion train: config error: {exc}", file=sys.stderr)
        return 2
    try:
        with _sigterm_interrupts():
            run_training(cfg, resume=args.resume)
    except ConfigError as exc:
        print(f"lorafusion train: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"lorafusion train: data error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"lorafusion train: checkpoint error: {exc}", file=sys.stderr)
        return 2
    except TrainError as exc:
        print(f"lorafusion train: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder that cannot be made or written, a file named like a folder
        print(f"lorafusion train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM before training began (loading or making the model), or a
        from lorafusion.train.checkpoint import resume_hint  # second signal during it

        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"lorafusion train: {what}; {resume_hint(cfg.train.output_dir)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


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
"""


def _cotrain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorafusion cotrain", description=COTRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config: model, output_dir, capacity, ..., jobs")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    args = parser.parse_args(argv)

    from lorafusion.train.checkpoint import CheckpointError, resume_hint
    from lorafusion.train.config import ConfigError

    try:
        from scheduling.executor import CoTrainer, CoTrainError, load_cotrain_config
        from lorafusion.train.trainer import Terminated, TrainError

        cfg = load_cotrain_config(args.config, {"output_dir": args.output_dir} if args.output_dir else None)
    except ConfigError as exc:
        print(f"lorafusion cotrain: config error: {exc}", file=sys.stderr)
        return 2
    try:
        with _sigterm_interrupts():
            summary = CoTrainer(cfg).run(resume=args.resume)
    except ConfigError as exc:
        print(f"lorafusion cotrain: config error: {exc}", file=sys.stderr)
        return 2
    except (CoTrainError, CheckpointError, TrainError, ValueError) as exc:
        print(f"lorafusion cotrain: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lorafusion cotrain: {type(exc).__name__}: {exc}; {resume_hint(cfg.output_dir)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"lorafusion cotrain: {what}; {resume_hint(cfg.output_dir)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    if "stopped" in summary:
        print(f"lorafusion cotrain: stopped ({summary['stopped']}) after microbatch {summary['next_microbatch']}; "
              f"{resume_hint(cfg.output_dir)}")
        return 0
    print(f"lorafusion cotrain: {len(summary['jobs'])} jobs, {summary['microbatches']} microbatches, "
          f"{summary['tokens']} tokens in {summary['train_seconds']:.1f} s; adapters in "
          f"{os.path.join(cfg.output_dir, 'adapters')}")
    for name, j in summary["jobs"].items():
        print(f"  {name}: {j['steps']} steps, loss {j['first_loss']:.4f} -> {j['last_loss']:.4f}")
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
    commands = {"train": _train, "plan": _plan, "cotrain": _cotrain}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lorafusion {train,plan,cotrain} ...\n\n"
              "  train     fine-tune a model with LoRA (lorafusion train --help)\n"
              "  plan      plan many fine-tuning jobs over one base model (lorafusion plan --help)\n"
              "  cotrain   co-train many jobs' adapters over one base model (lorafusion cotrain --help)")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"lorafusion: unknown command {argv[0]!r} (choose from train, plan, cotrain)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
