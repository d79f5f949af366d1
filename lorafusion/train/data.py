"""Training data: JSONL reading with line-numbered errors, tokenization with prompt masking, packing or padding.

Records are ``{"prompt": str, "completion": str}`` (loss on the completion tokens only) or ``{"text": str}`` (loss
on every token after the first). A sample is tokenized as ``tokenizer(prompt)`` (with the tokenizer's own special
tokens, e.g. BOS) + ``tokenizer(completion, add_special_tokens=False)`` + EOS, and cut to ``max_length``.

Batching is deterministic in (seed, step): the sample stream is the concatenation of per-epoch permutations; step
``s`` takes the next ``global_batch_size`` samples, process ``rank`` takes its contiguous share, and the share is
cut into microbatches of ``micro`` samples. The data position saved in a checkpoint is therefore just the step.

Packing puts several samples in one row of ``max_length`` tokens; position ids restart at 0 for each sample, which
makes transformers' sdpa / eager attention build a block-diagonal causal mask (``find_packed_sequence_indices``),
so no token attends across a sample boundary. The first label of every sample is ignored, so no loss crosses one
either.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("lorafusion.train")

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad or unusable training data; the message names the file and, where there is one, the line."""


@dataclass
class Sample:
    input_ids: list
    labels: list

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def jsonl_values(path):
    """(line number, JSON value, None) or (line number, None, problem) for each non-blank line of a UTF-8 JSONL file.
    Lines are decoded one by one, so a bad byte is one bad line, not a crash; a byte-order mark is skipped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at byte {exc.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            yield lineno, value, None


def _named(key: str | None) -> str:
    return f"{key}: " if key else ""


def check_data_file(path: str, key: str | None = None) -> None:
    """A ``DataError`` naming ``path`` (and the config ``key`` it came from) unless it is a file this process may
    read."""
    if not os.path.exists(path):
        raise DataError(f"{_named(key)}data file not found: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{_named(key)}data file {path} is not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{_named(key)}data file {path} cannot be read: Permission denied")


def data_files(cfg_data) -> list[tuple[str, str]]:
    """The (config key, path) of each JSONL file the data config names (built-in datasets are made, not read)."""
    return [(key, path) for key, path in (("data.train", cfg_data.train), ("data.eval", cfg_data.eval))
            if path is not None and not path.startswith("builtin:")]


def read_jsonl(path: str, skip_bad_lines: bool = False, key: str | None = None) -> tuple[list[dict], int]:
    """Records of a JSONL file and how many bad lines were skipped; a bad line fails with its number by default.
    ``key`` names the file in errors about the file itself (the config key it came from)."""
    check_data_file(path, key)
    records, skipped = [], 0
    try:
        for lineno, rec, problem in jsonl_values(path):
            if problem is None:
                problem = record_problem(rec)
            if problem is not None:
                if skip_bad_lines:
                    skipped += 1
                    logger.warning("%s:%d: skipped: %s", path, lineno, problem)
                    continue
                raise DataError(f"{path}:{lineno}: {problem} (pass --skip-bad-lines to skip bad lines)")
            records.append(rec)
    except OSError as e:  # no read permission, an I/O error
        raise DataError(f"{_named(key)}data file {path} cannot be read: {e.strerror or e}") from e
    if skipped:
        logger.warning("%s: skipped %d bad line(s)", path, skipped)
    if not records:
        raise DataError(f"{path}: no usable records (the dataset is empty"
                        f"{f' after skipping {skipped} bad lines' if skipped else ''})")
    return records, skipped


def record_problem(rec, text_field: str = "text") -> str | None:
    """Why ``rec`` is not a usable record (None when it is): a prompt / completion pair, or a text under
    ``text_field``; the message names the field."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if key not in rec:
                return f"missing field {key!r} (a prompt/completion record needs both)"
            if not isinstance(rec[key], str):
                return f"field {key!r} must be a string, got {type(rec[key]).__name__}"
        if not rec["completion"]:
            return "field 'completion' is empty"
        return None
    if text_field in rec:
        if not isinstance(rec[text_field], str):
            return f"field {text_field!r} must be a string, got {type(rec[text_field]).__name__}"
        if not rec[text_field]:
            return f"field {text_field!r} is empty"
        return None
    return f"missing fields: need 'prompt' and 'completion', or {text_field!r} (got keys {sorted(rec)})"


def check_eos(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one in the model folder's tokenizer config")


def record_tokens(rec: dict, tokenizer) -> tuple[list, list]:
    """Token ids and labels of one valid record (``record_problem`` is None), before any cut to a maximum length:
    the sample as training feeds it (the planner counts its tokens with this too)."""
    if "text" in rec and "prompt" not in rec:
        ids = tokenizer(rec["text"])["input_ids"] + [tokenizer.eos_token_id]
        return ids, [IGNORE_INDEX] + ids[1:]
    p = tokenizer(rec["prompt"])["input_ids"]
    c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(p) + c
    labels[0] = IGNORE_INDEX
    return p + c, labels


def tokenize_records(records: list[dict], tokenizer, max_length: int) -> tuple[list[Sample], dict]:
    """Samples with prompt tokens masked out of the labels, and counts: truncated, dropped (no loss token left)."""
    check_eos(tokenizer)
    samples, truncated, dropped = [], 0, 0
    for rec in records:
        ids, labels = record_tokens(rec, tokenizer)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        s = Sample(ids, labels)
        if s.n_loss_tokens == 0:
            dropped += 1
            continue
        samples.append(s)
    return samples, {"truncated": truncated, "dropped_no_loss_tokens": dropped}


def collate(samples: list[Sample], pad_id: int, max_length: int, packing: bool) -> dict:
    """One microbatch: ``input_ids``, ``labels``, ``position_ids`` and (padding only) ``attention_mask``."""
    if packing:
        rows: list[list[Sample]] = []
        room: list[int] = []
        for s in samples:  # first fit, in order
            for i, free in enumerate(room):
                if len(s.input_ids) <= free:
                    rows[i].append(s)
                    room[i] -= len(s.input_ids)
                    break
            else:
                rows.append([s])
                room.append(max_length - len(s.input_ids))
        width = max(max_length - r for r in room)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for s in row:
                n = len(s.input_ids)
                ids[i, at:at + n] = torch.tensor(s.input_ids)
                labels[i, at:at + n] = torch.tensor(s.labels)
                pos[i, at:at + n] = torch.arange(n)
                at += n
            pos[i, at:] = torch.arange(width - at)  # the padding tail is one more "sample" nobody attends to
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    pos = torch.arange(width).unsqueeze(0).expand(len(samples), -1).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


class StepBatches:
    """Deterministic samples per optimizer step: epoch permutations from ``seed``, the step's ``global_batch`` slice,
    this rank's share, cut into microbatches."""

    def __init__(self, n_samples: int, global_batch: int, micro: int, world_size: int, rank: int, seed: int):
        self.n, self.g, self.micro, self.world, self.rank, self.seed = n_samples, global_batch, micro, world_size, rank, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        out = []
        for k in range(step * self.g, (step + 1) * self.g):
            out.append(self._perm(k // self.n)[k % self.n])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.g / self.n

    def microbatches(self, step: int) -> tuple[list[list[int]], list[int]]:
        """(this rank's microbatches as sample indices, the whole step's sample indices)."""
        idx = self.global_indices(step)
        share = self.g // self.world
        mine = idx[self.rank * share:(self.rank + 1) * share]
        return [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)], idx


def load_split(cfg_data, tokenizer, seed: int) -> tuple[list[Sample], list[Sample], dict, list[dict]]:
    """Train samples, eval samples, stats, and the eval records (for the generation metric)."""
    from lorafusion.train.presets import data_preset_paths

    train_path, eval_path = cfg_data.train, cfg_data.eval
    if train_path.startswith("builtin:"):
        train_path, builtin_eval = data_preset_paths(train_path[len("builtin:"):])
        if eval_path is None:
            eval_path = builtin_eval
    train_recs, skipped = read_jsonl(train_path, cfg_data.skip_bad_lines, "data.train")
    if eval_path is not None:
        eval_recs, skipped_eval = read_jsonl(eval_path, cfg_data.skip_bad_lines,
                                             "data.eval" if cfg_data.eval is not None else "data.train's eval split")
        skipped += skipped_eval
    elif cfg_data.eval_fraction > 0:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train_recs), generator=gen).tolist()
        n_eval = max(1, int(round(len(train_recs) * cfg_data.eval_fraction)))
        if n_eval >= len(train_recs):
            raise DataError(f"{train_path}: {len(train_recs)} record(s) are too few to split off an eval set "
                            f"(data.eval_fraction={cfg_data.eval_fraction})")
        eval_recs = [train_recs[i] for i in perm[:n_eval]]
        train_recs = [train_recs[i] for i in sorted(perm[n_eval:])]
    else:
        eval_recs = []
    eval_recs = eval_recs[:cfg_data.max_eval_samples]
    train, st = tokenize_records(train_recs, tokenizer, cfg_data.max_length)
    evals, se = tokenize_records(eval_recs, tokenizer, cfg_data.max_length) if eval_recs else ([], {})
    if not train:
        raise DataError(f"{train_path}: no sample has a loss token left after truncation to "
                        f"data.max_length={cfg_data.max_length}")
    stats = {"train_samples": len(train), "eval_samples": len(evals), "skipped_bad_lines": skipped,
             "truncated": st["truncated"] + se.get("truncated", 0),
             "dropped_no_loss_tokens": st["dropped_no_loss_tokens"] + se.get("dropped_no_loss_tokens", 0),
             "train_path": train_path, "eval_path": eval_path}
    if stats["truncated"]:
        logger.warning("%d sample(s) longer than data.max_length=%d were truncated", stats["truncated"],
                       cfg_data.max_length)
    gen_recs = [r for r in eval_recs if "prompt" in r]
    return train, evals, stats, gen_recs
