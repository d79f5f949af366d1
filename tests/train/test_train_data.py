"""Data: line-numbered errors, prompt masking, and packing that keeps attention inside each sample."""
import json
import os

import pytest
import torch

from lorafusion.train.data import IGNORE_INDEX, DataError, Sample, StepBatches, collate, read_jsonl, tokenize_records
from lorafusion.train.presets import build_tokenizer


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_bad_line_reported_with_its_number(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "AB=", "completion": "ab"}), "{not json",
                             json.dumps({"prompt": "C="})])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    recs, skipped = read_jsonl(path, skip_bad_lines=True)
    assert (len(recs), skipped) == (1, 2)
    # a byte that is not UTF-8 is one bad line too (it once crashed the whole read, even when skipping)
    bad = tmp_path / "u.jsonl"
    bad.write_bytes(json.dumps({"prompt": "AB=", "completion": "ab"}).encode() + b'\n{"prompt": "\xff=", '
                    b'"completion": "x"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8 \(byte 0xff at byte 13\)"):
        read_jsonl(str(bad))
    recs, skipped = read_jsonl(str(bad), skip_bad_lines=True)
    assert (len(recs), skipped) == (1, 1)


@pytest.mark.parametrize("line,msg", [
    (json.dumps({"prompt": "A="}), "missing field 'completion'"),
    (json.dumps({"prompt": "A=", "completion": 3}), "field 'completion' must be a string"),
    (json.dumps({"foo": 1}), "need 'prompt' and 'completion', or 'text'"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_missing_or_wrong_fields(tmp_path, line, msg):
    with pytest.raises(DataError, match=f":1: .*{msg}"):
        read_jsonl(_write(tmp_path, [line]))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_jsonl(_write(tmp_path, [""]))
    with pytest.raises(DataError, match="not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_prompt_tokens_are_masked_and_truncation_counted():
    tok = build_tokenizer()
    samples, stats = tokenize_records([{"prompt": "ABC=", "completion": "abc"}, {"text": "abcabc"}], tok, 64)
    s = samples[0]
    n_prompt = len(tok("ABC=")["input_ids"])
    assert s.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert s.labels[n_prompt:] == s.input_ids[n_prompt:]
    assert tok.decode(s.input_ids[n_prompt:], skip_special_tokens=True) == "abc"
    assert s.input_ids[-1] == tok.eos_token_id
    assert samples[1].labels[0] == IGNORE_INDEX and samples[1].labels[1:] == samples[1].input_ids[1:]
    assert stats == {"truncated": 0, "dropped_no_loss_tokens": 0}
    samples, stats = tokenize_records([{"prompt": "ABCDEFGH=", "completion": "abcdefgh"},
                                       {"prompt": "ABCDEFGHABCDEFGH=", "completion": "a"}], tok, 12)
    assert stats == {"truncated": 2, "dropped_no_loss_tokens": 1}
    assert len(samples) == 1 and len(samples[0].input_ids) == 12



@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_keeps_attention_inside_each_sample(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(1)
    samples = []
    for n in (5, 9, 3, 12, 7, 2, 11):
        ids = torch.randint(4, 32, (n,), generator=gen).tolist()
        samples.append(Sample(ids, [IGNORE_INDEX] + ids[1:]))
    packed = collate(samples, 0, 16, packing=True)
    padded = collate(samples, 0, 16, packing=False)
    assert packed["input_ids"].shape[0] < len(samples)  # several samples share a row
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits, -1)
        ld = torch.log_softmax(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                     position_ids=padded["position_ids"], use_cache=False).logits, -1)
    # (1e-6: eager attention runs its softmax in fp32 even for fp64 models; a leak across samples is ~1e-1)
    # walk the packed rows sample by sample, in the order collate placed them (first fit)
    rows, room = [], []
    for i, s in enumerate(samples):
        for r, free in enumerate(room):
            if len(s.input_ids) <= free:
                rows[r].append(i)
                room[r] -= len(s.input_ids)
                break
        else:
            rows.append([i])
            room.append(16 - len(s.input_ids))
    checked = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i].input_ids)
            torch.testing.assert_close(lp[r, at:at + n], ld[i, :n], rtol=1e-6, atol=1e-6)
            at += n
            checked += 1
    assert checked == len(samples)
    # through the trainer's own loss: packed and padded microbatches give the same summed loss and token count
    from contextlib import nullcontext

    from lorafusion.train.trainer import loss_sum
    with torch.no_grad():
        sp, n_p = loss_sum(model, packed, "cpu", nullcontext)
        sd, n_d = loss_sum(model, padded, "cpu", nullcontext)
    assert n_p == n_d == sum(s.n_loss_tokens for s in samples)
    torch.testing.assert_close(sp, sd, rtol=1e-6, atol=1e-6)
    # and the loss over all label tokens is the same
    def total(logp, batch):
        tgt = batch["labels"][:, 1:]
        m = tgt != IGNORE_INDEX
        return -logp[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[m].sum()
    torch.testing.assert_close(total(lp, packed), total(ld, padded), rtol=1e-6, atol=1e-6)


def test_step_batches_split_a_step_between_ranks():
    one = StepBatches(50, 8, 2, 1, 0, seed=3)
    two = [StepBatches(50, 8, 2, 2, r, seed=3) for r in range(2)]
    for step in (0, 6, 7):  # step 6 crosses the epoch boundary (samples 48..55)
        mb1, idx = one.microbatches(step)
        mb2 = [b.microbatches(step)[0] for b in two]
        assert sum(mb1, []) == sum(mb2[0], []) + sum(mb2[1], []) == idx
        assert all(len(m) == 2 for m in mb1)
    assert len(set(one.global_indices(0) + one.global_indices(1))) == 16


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "AB=", "completion": "ab"}\n{"text": "cd"}\n')
    recs, skipped = read_jsonl(str(path))
    assert recs == [{"prompt": "AB=", "completion": "ab"}, {"text": "cd"}] and skipped == 0


def test_unreadable_data_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    """A data file that exists but cannot be opened (no permission; root reads anything, so the error is injected)
    is a DataError naming the file, as a missing one is, not a PermissionError traceback."""
    path = _write(tmp_path, ['{"text": "ab"}'])
    assert len(read_jsonl(path)[0]) == 1
    real_open = open

    def denied(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(DataError, match=r"data file .* cannot be read: Permission denied"):
        read_jsonl(path)


def test_preset_cache_folders_are_keyed_by_the_recipe_and_readable_by_others(tmp_path, monkeypatch):
    """The key was the name and a hand-bumped version, so a changed recipe silently reused the old model; and
    mkdtemp's 0700 folder made a cache filled by one user (an image built as root) unreadable to the others."""
    import hashlib
    import stat

    from lorafusion.train import presets

    monkeypatch.setenv("LORAFUSION_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        train, _ = presets.data_preset_paths("lowercase")
    finally:
        os.umask(old)
    with open(presets.__file__, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    folder = os.path.dirname(train)
    assert os.path.basename(folder) == f"data-lowercase-{presets.PRESET_VERSION}-{digest}"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755 and stat.S_IMODE(os.stat(train).st_mode) == 0o644


def test_preset_build_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path, monkeypatch):
    """A build killed by SIGKILL (no finally runs) left its temporary folder in the cache for ever. The next build
    removes the folders of this host's processes that are gone, and keeps those of live ones (a build running)."""
    import subprocess
    import sys

    from lorafusion.train import presets

    monkeypatch.setenv("LORAFUSION_CACHE", str(tmp_path))
    final = os.path.join(str(tmp_path), "presets", "thing")
    os.makedirs(os.path.dirname(final))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_tmp = presets._tmp_prefix(final, dead.pid) + "abc"
    live_tmp = presets._tmp_prefix(final, os.getppid()) + "def"
    other = "thing.tmp-otherhost-" + str(dead.pid) + "-ghi"  # another host's pid means nothing here: kept
    for name in (dead_tmp, live_tmp, other):
        os.makedirs(os.path.join(os.path.dirname(final), name, "half"))

    def build(folder):
        assert os.path.basename(folder).startswith(presets._tmp_prefix(final))
        with open(os.path.join(folder, "lorafusion_preset.json"), "w") as fh:
            fh.write("{}")

    assert presets._atomic_folder(final, build) == final
    assert sorted(os.listdir(os.path.dirname(final))) == sorted(["thing", live_tmp, other])
