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
           "qwen2-tied": lambda: AutoConfig.for_model("qwen2", tie_word_embeddings=True, **kw)}[arch.split(":")[0]]()
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    if arch.endswith(":head-only"):  # the tied matrix stored under the head's name alone, as some exporters write it
        from safetensors.torch import load_file, save_file

        f = os.path.join(folder, "model.safetensors")
        sd = load_file(f)
        sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
        save_file(sd, f, metadata={"format": "pt"})
    return str(folder)


def _kept(names, layers: range, first: bool, last: bool, tied: bool):
    def keep(n):
        if n.startswith("model.layers."):
            return int(n.split(".")[2]) in layers
        if n.startswith("model.embed_tokens."):
            return first or (tied and last)
        return last  # model.norm, lm_head
    return {n for n in names if keep(n)}


@pytest.mark.parametrize("arch", ["llama", "qwen2-tied", "qwen2-tied:head-only"])
def test_a_stage_reads_only_its_share(tmp_path, arch, capfd):
    from transformers import AutoModelForCausalLM

    path = _model(tmp_path / arch.replace(":", "-"), arch, 5)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    ref = dict(whole.named_parameters(remove_duplicate=False))
    tied = "tied" in arch
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


def test_an_output_head_under_another_name_is_dropped_before_the_last_stage(tmp_path):
    """The head goes by ``get_output_embeddings()``, not by the name ``lm_head``: a stage before the last neither
    reads it nor keeps it."""
    import types

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorafusion.multi import MultiLoRAModel
    from scheduling.pipeline import PipelineCoTrainer

    class OutConfig(LlamaConfig):
        model_type = "llama_output_head_test"

    class OutLM(LlamaForCausalLM):
        config_class = OutConfig

        def __init__(self, config):
            super().__init__(config)
            self.output = self.lm_head
            del self.lm_head

        def get_output_embeddings(self):
            return self.output

    AutoConfig.register(OutConfig.model_type, OutConfig, exist_ok=True)
    AutoModelForCausalLM.register(OutConfig, OutLM, exist_ok=True)
    OutLM(OutConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(tmp_path)
    model, ranges = load_stage(str(tmp_path), torch.float64, 0, 2)
    assert model.output.weight.is_meta and not model.model.embed_tokens.weight.is_meta
    stage = types.SimpleNamespace(mm=MultiLoRAModel(model, target_modules=["q_proj", "v_proj"]), rank=0, world=2,
                                  first=True, last=False, layer_ranges=ranges, device=torch.device("cpu"),
                                  cfg=types.SimpleNamespace(model=str(tmp_path)))
    PipelineCoTrainer._place(stage)
    assert isinstance(model.output, torch.nn.Identity)
    assert not any(t.is_meta for t in model.parameters())
