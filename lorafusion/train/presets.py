"""The built-in default: a tiny Llama, its character tokenizer and a synthetic task, all made here, no downloads.

``builtin:tiny-llama`` is a 2-layer Llama (hidden 128, 4 heads, 2 KV heads, ~0.4 M parameters) over a 32-symbol
character vocabulary. It is pre-trained once, deterministically (fixed seeds, ~400 AdamW steps, well under a minute on
two CPU cores), on a generic corpus of two string tasks over the letters a-l / A-L:

    "aBc>"  -> "aBc"   copy the string
    "abc^"  -> "ABC"   copy it in upper case

and saved as an ordinary Hugging Face folder (config, safetensors weights, tokenizer files) in the cache folder
(``$LORAFUSION_CACHE`` or ``~/.cache/lorafusion``), so every later run loads it like any local model.

``builtin:lowercase`` is the fine-tuning task: a new instruction the base model has never seen,

    "ABC="  -> "abc"   copy the string in lower case

generated deterministically (2000 train / 200 eval samples, strings of 3-6 letters, eval strings disjoint from
train). The metric is exact match: the fraction of eval prompts whose greedy completion equals the target string
exactly. The base model scores ~0 (it has no lower-case instruction); LoRA teaches it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile

import torch

logger = logging.getLogger("lorafusion.train")

PRESET_VERSION = "v1"


def _recipe_key() -> str:
    """A digest of this module's source: the presets' recipes (model config, pre-training, data generation) live
    here, so a changed recipe makes new cache folders instead of silently reusing the old model or data."""
    import hashlib

    with open(__file__, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]
LOWER = "abcdefghijkl"
UPPER = LOWER.upper()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SYMBOLS = list(LOWER + UPPER + ">^=") + [" "]
MODEL_PRESETS = ("tiny-llama",)
DATA_PRESETS = ("lowercase",)


def cache_root() -> str:
    return os.environ.get("LORAFUSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorafusion")


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: one token per character, BOS prepended, decode joins chars."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256)


def _rand_str(rng: random.Random, alphabet: str, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _pretrain_sample(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        s = _rand_str(rng, LOWER + UPPER)
        return s + ">", s
    s = _rand_str(rng, LOWER)
    return s + "^", s.upper()


def _materialise_tiny_llama(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    assert len(tok) <= cfg.vocab_size
    saved_rng, saved_threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever the caller's thread count (CPU reductions depend on it)
    try:
        torch.manual_seed(1234)
        model = LlamaForCausalLM(cfg)
        rng = random.Random(1234)
        steps, batch = 400, 64
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 40) * max(0.05, 1 - s / steps))
        logger.info("materialising builtin:tiny-llama into %s (pre-training %d steps on the copy/upper-case corpus)",
                    folder, steps)
        model.train()
        for step in range(steps):
            samples = [_pretrain_sample(rng) for _ in range(batch)]
            seqs, starts = [], []
            for p, c in samples:
                pi = tok(p)["input_ids"]
                seqs.append(pi + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                starts.append(len(pi))
            width = max(map(len, seqs))
            ids = torch.full((batch, width), tok.pad_token_id)
            labels = torch.full((batch, width), -100)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                labels[i, starts[i]:len(s)] = torch.tensor(s[starts[i]:])
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == steps - 1:
                logger.info("  pre-train step %d loss %.4f", step, loss.item())
    finally:  # the caller's generator and thread count, whatever happens
        torch.random.set_rng_state(saved_rng)
        torch.set_num_threads(saved_threads)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with open(os.path.join(folder, "lorafusion_preset.json"), "w") as fh:
        json.dump({"preset": "tiny-llama", "version": PRESET_VERSION, "pretrain_steps": steps,
                   "final_pretrain_loss": loss.item()}, fh)


def _tmp_prefix(final: str, pid: int | None = None) -> str:
    """The name every temporary build folder of ``final`` starts with: host and pid, so a later process can tell the
    leftovers of a killed build (SIGKILL, power loss) from a build still running."""
    import socket

    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    return f"{os.path.basename(final)}.tmp-{host}-{os.getpid() if pid is None else pid}-"


def _remove_stale_builds(final: str) -> None:
    """Removes temporary build folders of ``final`` left by processes of this host that are gone."""
    parent, mine = os.path.dirname(final), _tmp_prefix(final, 0)[:-2]  # "<name>.tmp-<host>-"
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(mine) + r"(\d+)-.*", name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # still running (or another user's live process)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        logger.info("removing %s, left by a build (pid %d) that did not finish", name, pid)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _atomic_folder(final: str, build) -> str:
    if os.path.isfile(os.path.join(final, "lorafusion_preset.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    _remove_stale_builds(final)
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=os.path.dirname(final))
    try:
        build(tmp)
        # mkdtemp makes the folder 0700: a cache filled by one user (an image built as root) must be readable by
        # the users who run it, as a folder made with the umask would be
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(final, "lorafusion_preset.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def model_preset_path(name: str) -> str:
    """The local folder of built-in model ``name``, materialising it on first use."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model.name_or_path: unknown built-in model 'builtin:{name}' (known: "
                         f"{', '.join('builtin:' + n for n in MODEL_PRESETS)})")
    return _atomic_folder(os.path.join(cache_root(), "presets", f"{name}-{PRESET_VERSION}-{_recipe_key()}"),
                         _materialise_tiny_llama)


def model_folder(name_or_path: str) -> str:
    """The local Hugging Face folder of ``name_or_path``: a built-in model (made on first use) or a folder holding
    a config.json; a ValueError saying which it is not."""
    if name_or_path.startswith("builtin:"):
        try:
            return model_preset_path(name_or_path[len("builtin:"):])
        except ValueError as exc:
            raise ValueError(f"{name_or_path!r} is not a built-in model ({str(exc).split(': ', 1)[-1]})") from None
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise ValueError(f"{name_or_path} is not a Hugging Face model folder (no config.json)")
    return name_or_path


def _write_lowercase(folder: str) -> None:
    rng = random.Random(4321)
    seen: set = set()
    rows = []
    while len(rows) < 2200:
        s = _rand_str(rng, UPPER)
        if s in seen:
            continue
        seen.add(s)
        rows.append({"prompt": s + "=", "completion": s.lower()})
    for name, part in (("train.jsonl", rows[:2000]), ("eval.jsonl", rows[2000:])):
        with open(os.path.join(folder, name), "w") as fh:
            for r in part:
                fh.write(json.dumps(r) + "\n")
    with open(os.path.join(folder, "lorafusion_preset.json"), "w") as fh:
        json.dump({"preset": "lowercase", "version": PRESET_VERSION, "train": 2000, "eval": 200}, fh)


def data_preset_paths(name: str) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) of built-in task ``name``, generated on first use."""
    if name not in DATA_PRESETS:
        raise ValueError(f"data.train: unknown built-in dataset 'builtin:{name}' (known: "
                         f"{', '.join('builtin:' + n for n in DATA_PRESETS)})")
    folder = _atomic_folder(os.path.join(cache_root(), "presets", f"data-{name}-{PRESET_VERSION}-{_recipe_key()}"),
                           _write_lowercase)
    return os.path.join(folder, "train.jsonl"), os.path.join(folder, "eval.jsonl")
