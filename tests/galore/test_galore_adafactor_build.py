"""GaLoreAdafactor against galore-torch 1.0; build_optimizer's parameter choice and names."""

import copy

import pytest
import torch
from torch import nn

import galore
from galore_test_helpers import (
    fresh_seed, galore_groups, make_batches, make_model, max_param_rel_err, train, train_on_shared_gradients,
)

galore_torch = pytest.importorskip("galore_torch")


@pytest.mark.parametrize("kwargs", [
    {},  # relative step, parameter scaling: the defaults
    {"lr": 2e-3, "relative_step": False, "scale_parameter": False, "beta1": 0.9, "weight_decay": 0.01},
])
def test_adafactor_trajectory_matches_galore_torch(kwargs):
    seed = fresh_seed()
    model = make_model(seed)
    ref_model = copy.deepcopy(model)
    start = copy.deepcopy(model)
    batches = make_batches(seed, 30)
    # the same gradient tensors for both: see test_galore_adamw.py's trajectory test (two backward passes differ in
    # the last bits, which can flip an SVD sign at a basis refresh)
    train_on_shared_gradients(model, ref_model, galore.GaLoreAdafactor(galore_groups(model, gap=7), **kwargs),
                              galore_torch.GaLoreAdafactor(galore_groups(ref_model, gap=7), **kwargs), batches)
    err = max_param_rel_err(model, ref_model)
    assert err < 1e-5, f"seed={seed}: {err}"
    assert max_param_rel_err(model, start) > 1e-3


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def _lora_model(seed):
    model = make_model(seed)
    model.up = LoRALinear(model.up)
    model.down = LoRALinear(model.down)
    model.head.requires_grad_(False)
    model.norm.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", sorted(n for n in galore.NAMES))
def test_build_optimizer_on_lora_model_trains_adapters_with_plain_updates(name):
    """The training CLI's call: all-linear on a model whose trainable parameters are LoRA adapters smaller than
    rank -> nothing projected, every adapter still updated."""
    seed = fresh_seed()
    model = _lora_model(seed)
    opt = galore.build_optimizer(model, name, target_modules="all-linear", lr=1e-2, weight_decay=0.0, rank=8,
                                 update_proj_gap=50, scale=0.25, proj_type="std")
    assert all("rank" not in g for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, make_batches(seed, 3))
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n


def test_build_optimizer_target_modules_forms():
    model = make_model(fresh_seed())
    opt = galore.build_optimizer(model, "galore_adamw", target_modules="all-linear", rank=4)
    assert opt.param_groups[0]["param_names"] == ["up.weight", "down.weight", "head.weight"]
    assert opt.param_groups[0]["rank"] == 4
    assert "rank" not in opt.param_groups[1] and "up.bias" in opt.param_groups[1]["param_names"]
    opt = galore.build_optimizer(model, "galore_adamw8bit", target_modules=["down"], rank=4)
    assert opt.param_groups[0]["param_names"] == ["down.weight"]
    opt = galore.build_optimizer(model, "galore_adafactor", target_modules=r"(up|head)", rank=4, lr=None)
    assert opt.param_groups[0]["param_names"] == ["up.weight", "head.weight"]
    assert opt.param_groups[0]["relative_step"] is True
    opt = galore.build_optimizer(model, "adamw", rank=4)
    assert len(opt.param_groups) == 1 and "rank" not in opt.param_groups[0]
    assert isinstance(galore.build_optimizer(model, "adamw8bit"), galore.AdamW8bit)


@pytest.mark.parametrize("args,err,pattern", [
    (("sgd",), ValueError, r"name must be one of .*'sgd'"),
    (("galore_adamw", 5), TypeError, r"target_modules must be .*5"),
    (("galore_adamw", "up("), ValueError, r"target_modules='up\(' is not a valid regex"),
])
def test_build_optimizer_bad_input(args, err, pattern):
    with pytest.raises(err, match=pattern):
        galore.build_optimizer(make_model(1), *args)


def test_build_optimizer_explicit_target_too_small_for_rank_names_it():
    with pytest.raises(ValueError, match=r"rank=20 .*head\.weight"):
        galore.build_optimizer(make_model(1), "galore_adamw", target_modules=["head"], rank=20)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        galore.build_optimizer("model", "adamw")
    with pytest.raises(ValueError, match="max_grad_norm=1.0 applies to layer-wise mode only"):
        galore.build_optimizer(make_model(1), "adamw", max_grad_norm=1.0)
