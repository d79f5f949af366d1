"""A pipeline stage reads only its share of the base model (``scheduling.pipeline.load_stage``): its decoder layers,
the embedding on the first stage (and on the last where the output head is tied to it), the final norm and the
output head on the last; every tensor it reads equals the whole model's, and the loader reports no skipped keys."""
import os

import pytest
import torch

from lorafusion.train.config import ConfigError
from scheduling.pipeline import load_stage, split_layers


def _model(folder, arch: str, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"llama": lambda: AutoConfig.for_model("llama", tie_word_embeddings=False, **kw),
           "qwen2-tied": lambda: AutoConfig.for_model("qwen2", tie_word_embeddings=True, **kw)}[arch]()
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return str(folder)


def _kept(names, layers: range, first: bool, last: bool, tied: bool):
    def keep(n):
        if n.startswith("model.layers."):
            return int(n.split(".")[2]) in layers
        if n.startswith("model.embed_tokens."):
            return first or (tied and last)
        return last  # model.norm, lm_head
    return {n for n in names if keep(n)}


@pytest.mark.parametrize("arch", ["llama", "qwen2-tied"])
def test_a_stage_reads_only_its_share(tmp_path, arch, capfd):
    from transformers import AutoModelForCausalLM

    path = _model(tmp_path / arch, arch, 5)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    ref = dict(whole.named_parameters(remove_duplicate=False))
    tied = arch.endswith("tied")
    assert (ref["lm_head.weight"] is ref["model.embed_tokens.weight"]) == tied
    for world in (2, 3):
        for rank in range(world):
            capfd.readouterr()
            model, ranges = load_stage(path, torch.float64, rank, world)
            assert ranges == split_layers(5, world)
            err = capfd.readouterr().err  # transformers' load report (to stderr) names no missing or unexpected key
            assert "LOAD REPORT" not in err and "UNEXPECTED" not in err and "MISSING" not in err, err
            params = dict(model.named_parameters(remove_duplicate=False))
            assert params.keys() == ref.keys()  # module paths stay the whole model's
            real = {n for n, p in params.items() if not p.is_meta}
            assert real == _kept(ref, ranges[rank], rank == 0, rank == world - 1, tied), (world, rank)
            for n in real:
                assert params[n].dtype == torch.float64
                assert torch.equal(params[n], ref[n]), n
            if tied and rank == world - 1:  # the head shares the embedding's storage, as the whole model's does
                assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
            for n, buf in model.named_buffers():  # the rotary tables are made on every stage
                assert not buf.is_meta and torch.equal(buf, dict(whole.named_buffers())[n]), n


def test_more_stages_than_layers_is_a_stages_error(tmp_path):
    path = _model(tmp_path / "m", "llama", 2)
    with pytest.raises(ConfigError, match="^stages: 3 stages for 2 decoder layers"):
        load_stage(path, torch.float32, 0, 3)
