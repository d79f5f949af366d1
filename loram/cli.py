"""The ``loram`` command (also ``python -m loram``): train small, infer large.

    loram run [--config run.yaml] --out DIR [prune options] [--section.key value ...]
        prune the run's model, train LoRA on the pruned model (``lorafusion train`` with the same config and
        overrides), recover the adapter to the full model and evaluate it there; run it again to resume
    loram prune --model DIR|builtin:tiny-llama --out DIR [prune options]
    loram recover --pruned DIR --adapter DIR --out DIR [--base-model DIR]
    loram estimate --model DIR|config.json --keep-ratio R [--attn-keep-ratio R]
        parameters and weight memory (16-bit, NF4) of the full and the pruned model, from the config alone

Exit codes: 0 done, 2 bad arguments, config, data, model or adapter (one line on stderr naming the problem).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from loram.prune import IMPORTANCE, PruneError


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _prune_options(p: argparse.ArgumentParser, calibration_default: str | None) -> None:
    p.add_argument("--keep-ratio", type=_ratio, required=True,
                   help="share of each layer's MLP channels kept (and of its KV groups, unless --attn-keep-ratio)")
    p.add_argument("--attn-keep-ratio", type=_ratio, default=None, help="share of each layer's KV groups kept")
    p.add_argument("--importance", choices=IMPORTANCE, default="taylor",
                   help="taylor: first-order loss change on calibration data (default); magnitude: weight norms")
    p.add_argument("--calibration", default=calibration_default,
                   help="calibration data for taylor: a JSONL file or builtin:<task>"
                        + (" (default: the run's training data)" if calibration_default == "train" else ""))
    p.add_argument("--calibration-samples", type=_positive, default=128)
    p.add_argument("--channel-multiple", type=_positive, default=1,
                   help="round the kept MLP channels to a multiple of this (e.g. 64 or 128 for GPU GEMMs)")
    p.add_argument("--prune-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="precision the full model is loaded, scored and the pruned one saved in (auto: as stored)")
    p.add_argument("--prune-device", default="cpu", help="where the full model is scored (cpu, cuda, cuda:1, ...)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="loram", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="prune, train on the pruned model, recover, evaluate on the full model")
    p_run.add_argument("--config", help="a lorafusion train YAML config (its model is the one pruned)")
    p_run.add_argument("--out", required=True, help="output folder (pruned/, train/, adapter/, summary.json)")
    _prune_options(p_run, "train")
    p_prune = sub.add_parser("prune", help="prune a model folder")
    p_prune.add_argument("--model", required=True, help="a Hugging Face model folder or builtin:tiny-llama")
    p_prune.add_argument("--out", required=True, help="the pruned model's folder")
    p_prune.add_argument("--max-length", type=_positive, default=32, help="calibration tokens per sample")
    p_prune.add_argument("--seed", type=int, default=0, help="seed of the calibration sample draw")
    _prune_options(p_prune, None)
    p_rec = sub.add_parser("recover", help="recover a pruned model's adapter to the full model")
    p_rec.add_argument("--pruned", required=True, help="the pruned model's folder (holds loram_plan.json)")
    p_rec.add_argument("--adapter", required=True, help="the PEFT adapter folder trained on the pruned model")
    p_rec.add_argument("--out", required=True, help="the full model's adapter folder to write")
    p_rec.add_argument("--base-model", default=None,
                       help="base_model_name_or_path to record (default: the full model the pruning recorded)")
    p_est = sub.add_parser("estimate", help="parameters and weight memory of the full and pruned model, from a config")
    p_est.add_argument("--model", required=True, help="a model folder (only its config.json is read) or a config.json")
    p_est.add_argument("--keep-ratio", type=_ratio, required=True)
    p_est.add_argument("--attn-keep-ratio", type=_ratio, default=None)
    p_est.add_argument("--channel-multiple", type=_positive, default=1)
    p_est.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                       help="train.precision of the NF4 run: what the parameters NF4 leaves alone are kept in")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from lorafusion.train.checkpoint import CheckpointError
    from lorafusion.train.config import ConfigError
    from lorafusion.train.data import DataError
    from lorafusion.train.trainer import TrainError

    try:
        if args.command == "prune":
            from loram.pipeline import PRUNE_META, prune_to_folder

            record = prune_to_folder(args.model, args.out, keep_ratio=args.keep_ratio,
                                     attn_keep_ratio=args.attn_keep_ratio, importance=args.importance,
                                     calibration=args.calibration, calibration_samples=args.calibration_samples,
                                     max_length=args.max_length, channel_multiple=args.channel_multiple,
                                     seed=args.seed, dtype=args.prune_dtype, device=args.prune_device)
            print(f"pruned {record['parameters_full']:,} -> {record['parameters_pruned']:,} parameters (KV heads "
                  f"{record['kept_kv_heads']}/{record['kv_heads']}, MLP channels {record['kept_channels']}/"
                  f"{record['channels']}); the record is {os.path.join(args.out, PRUNE_META)}")
        elif args.command == "estimate":
            from transformers import AutoConfig

            from loram.memory import estimate

            try:
                config = AutoConfig.from_pretrained(args.model)
            except (OSError, ValueError) as exc:
                raise PruneError(f"model: cannot read a config from {args.model}: {exc}") from None
            e = estimate(config, args.keep_ratio, args.attn_keep_ratio, args.channel_multiple, args.precision)
            print(f"KV heads {e['kept_kv_heads']}/{e['kv_heads']}, MLP channels {e['kept_channels']}/{e['channels']}")
            for name in ("full", "pruned"):
                r = e[name]
                print(f"{name:<7} {r['parameters'] / 1e9:8.2f} B parameters  {r['gib_16bit']:8.2f} GiB in 16 bits  "
                      f"{r['gib_nf4']:8.2f} GiB in NF4 (the rest {e['precision']})")
            print(f"full 16-bit / pruned NF4: {e['reduction_16bit_to_pruned_nf4']:.2f}x")
        elif args.command == "recover":
            from loram.recover import recover_adapter

            print(recover_adapter(args.adapter, args.pruned, args.out, base_model_name_or_path=args.base_model))
        else:
            from lorafusion.train.config import load_config, parse_overrides
            from loram.pipeline import run

            cfg = load_config(args.config, parse_overrides(rest))
            summary = run(cfg, args.out, keep_ratio=args.keep_ratio, attn_keep_ratio=args.attn_keep_ratio,
                          importance=args.importance, calibration=args.calibration,
                          calibration_samples=args.calibration_samples, channel_multiple=args.channel_multiple,
                          dtype=args.prune_dtype, device=args.prune_device)
            _print_summary(summary)
    except (PruneError, ConfigError, DataError, CheckpointError, TrainError, OSError) as exc:
        print(f"loram {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_summary(s: dict) -> None:
    if s.get("status") != "completed":
        print(f"loram run: training {s.get('status')}; run the same command again to resume")
        return
    p = s["prune"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print("── loram run: summary ──")
    print(f"pruned {p['parameters_full']:,} -> {p['parameters_pruned']:,} parameters "
          f"(KV heads {p['kept_kv_heads']}/{p['kv_heads']}, MLP channels {p['kept_channels']}/{p['channels']}, "
          f"{p['importance']} importance)")
    for name, key in (("full model alone", "full_model"), ("pruned model + adapter", "pruned_model_with_adapter"),
                      ("full model + recovered adapter", "full_model_with_recovered_adapter")):
        r = s[key]
        loss = r.get("eval_loss")
        print(f"{name:<32} eval loss {'n/a' if loss is None else f'{loss:.4f}'}, "
              f"exact match {pct(r.get('eval_exact_match'))}")
    print(f"recovered adapter: {s['adapter_dir']}")
