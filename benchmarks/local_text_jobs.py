"""A planner mix whose sample lengths come from local text, for `benchmarks/planner.py --jobs` (issue 6: "lengths
from any local dataset"). No downloads: the texts are what every Python install carries, tokenised by the project's
built-in character-level tokenizer (one token per character, so lengths run about 4x those of a BPE tokenizer).

Four jobs with different length profiles, each a JSONL dataset of `text` records (one epoch, global batch 16;
texts cut at --max-chars as a fine-tuning run cuts at its sequence length; samples longer than the capacity are split,
`allow_split`):

  stdlib-funcdocs   docstrings of the standard library's functions and methods (short)
  stdlib-moddocs    module docstrings of the standard library (short to long)
  pkg-readmes       long descriptions (README) of the installed distributions (long, heavy-tailed)
  stdlib-code       source of the standard library's top-level functions (medium, heavy-tailed)

    python benchmarks/local_text_jobs.py --out-dir /tmp/lf_local   # local_texts.yaml, the datasets, the tokenizer
    python benchmarks/planner.py --ideal --jobs /tmp/lf_local/local_texts.yaml   # with the synthetic mixes
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafusion.train.presets import build_tokenizer  # noqa: E402

BATCH = 16


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py")) + sorted(root.glob("*/*.py"))


def stdlib_texts() -> dict[str, list[str]]:
    """Function docstrings, module docstrings and top-level function sources of the standard library."""
    out: dict[str, list[str]] = {"stdlib-funcdocs": [], "stdlib-moddocs": [], "stdlib-code": []}
    for path in _stdlib_files():
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) >= 40:
            out["stdlib-moddocs"].append(doc)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 40:
                    out["stdlib-funcdocs"].append(d)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                seg = ast.get_source_segment(src, node)
                if seg and len(seg) >= 80:
                    out["stdlib-code"].append(seg)
    return out


def readme_texts() -> list[str]:
    texts = []
    for dist in metadata.distributions():
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        if len(body) >= 200:
            texts.append(body)
    return sorted(set(texts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=0, help="which texts are drawn")
    ap.add_argument("--global-batches", type=int, nargs=4, default=[4, 3, 3, 4],
                    help="global batches per job (funcdocs, moddocs, readmes, code)")
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--max-chars", type=int, default=8192, help="texts are cut to this many characters")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpora = stdlib_texts()
    corpora["pkg-readmes"] = readme_texts()
    order = ["stdlib-funcdocs", "stdlib-moddocs", "pkg-readmes", "stdlib-code"]
    tok_dir = out / "tokenizer"
    build_tokenizer().save_pretrained(tok_dir)
    rng = random.Random(args.seed)
    jobs = []
    for name, n_gb in zip(order, args.global_batches):
        texts = corpora[name]
        need = BATCH * n_gb
        if len(texts) < need:
            raise SystemExit(f"{name}: only {len(texts)} texts here, {need} needed")
        picked = [t[:args.max_chars] for t in rng.sample(texts, need)]
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            for t in picked:
                f.write(json.dumps({"text": t}) + "\n")
        jobs.append({"adapter": name, "dataset": path.name, "tokenizer": str(tok_dir), "text_field": "text",
                     "global_batch_size": BATCH, "epochs": 1, "allow_split": True})
        lengths = sorted(len(t) + 2 for t in picked)  # + the BOS token and the EOS training appends
        print(f"{name:<16} {len(texts):>6} texts, {need} drawn; tokens median {lengths[len(lengths) // 2]}, "
              f"max {lengths[-1]}")
    doc = {"capacity": args.capacity, "pad_multiple": 128, "stages": 4, "seed": args.seed, "jobs": jobs}
    (out / "local_texts.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {out / 'local_texts.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
