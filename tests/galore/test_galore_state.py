"""State you can trust: weights_only loading, resume equality, dtype preservation; and input validation."""

import copy
import io

import pytest
import torch

import galore
from galore_test_helpers import (
    assert_same_8bit_trajectory, fresh_seed, galore_groups, make_batches, make_model, max_param_rel_err, train,
    train_on_shared_gradients,
)

OPTIMIZERS = {
    "galore_adamw": lambda groups: galore.GaLoreAdamW(groups, lr=3e-3, weight_decay=0.01),
    "galore_adamw8bit": lambda groups: galore.GaLoreAdamW8bit(groups, lr=3e-3, min_8bit_size=64),
    "galore_adafactor": lambda groups: galore.GaLoreAdafactor(groups, lr=3e-3, relative_step=False,
                                                              scale_parameter=False, beta1=0.9),
}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_save_load_continue_equals_uninterrupted(name):
    seed = fresh_seed()
    batches = make_batches(seed, 14)
    make = OPTIMIZERS[name]
    model = make_model(seed)
    model_b = copy.deepcopy(model)
    opt = make(galore_groups(model, gap=4))
    opt_b = make(galore_groups(model_b, gap=4))
    # The interrupted run steps on the uninterrupted run's gradient tensors (galore_test_helpers: a last-bit
    # difference between two backward passes can flip an 8-bit state value); what is compared is the state's save
    # and load. Stop mid-period (basis refreshed at steps 0 and 4; next at 8).
    train_on_shared_gradients(model, model_b, opt, opt_b, batches[:6])
    saved_model = _roundtrip(model_b.state_dict())
    saved_opt = _roundtrip(opt_b.state_dict())
    # no projector objects: only tensors and plain values
    for st in saved_opt["state"].values():
        for v in st.values():
            assert isinstance(v, (torch.Tensor, int, float, str)), type(v)
    resumed = make_model(seed + 99)  # different init, fully overwritten by the load
    resumed.load_state_dict(saved_model)
    opt_c = make(galore_groups(resumed, gap=4))
    opt_c.load_state_dict(saved_opt)
    train_on_shared_gradients(model, resumed, opt, opt_c, batches[6:])
    if name == "galore_adamw8bit":  # bitwise, but for the rare 8-bit flip galore_test_helpers describes
        assert_same_8bit_trajectory(resumed, model, opt_c, f"seed={seed} {name}: resumed run")
    else:
        err = max_param_rel_err(resumed, model)
        assert err < 1e-6, f"seed={seed} {name}: resumed run differs by {err}"


def test_load_keeps_fp32_moments_of_bf16_parameters():
    seed = fresh_seed()
    model = make_model(seed, dtype=torch.bfloat16)
    opt = galore.GaLoreAdamW8bit(galore_groups(model), lr=1e-3, min_8bit_size=64)
    train(model, opt, make_batches(seed, 2, dtype=torch.bfloat16))
    sd = _roundtrip(opt.state_dict())
    opt2 = galore.GaLoreAdamW8bit(galore_groups(model), lr=1e-3, min_8bit_size=64)
    opt2.load_state_dict(sd)
    st = opt2.state[model.up.weight]
    assert st["absmax1"].dtype == torch.float32 and st["state1"].dtype == torch.uint8
    assert torch.equal(st["absmax1"], opt.state[model.up.weight]["absmax1"])
    assert opt2.state[model.norm.weight]["state1"].dtype == torch.float32  # bitsandbytes 32-bit path, fp32 moments


# ---------------------------------------------------------------- bad input names the parameter and the value
def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("cls", [galore.GaLoreAdamW, galore.GaLoreAdamW8bit, galore.GaLoreAdafactor])
def test_rank_larger_than_smaller_side_names_the_parameter(cls):
    model = make_model(fresh_seed())
    groups = galore_groups(model, rank=18, named=True)  # down.weight is 17x40
    kwargs = {"lr": 1e-3, "relative_step": False} if cls is galore.GaLoreAdafactor else {}
    with pytest.raises(ValueError, match=r"rank=18 .*down\.weight \(shape \(17, 40\), smaller side 17\)"):
        cls(groups, **kwargs)


@pytest.mark.parametrize("group,err,pattern", [
    ({"rank": 0}, ValueError, r"rank must be >= 1, got 0"),
    ({"rank": 2.5}, TypeError, r"rank must be an int, got 2\.5"),
    ({"rank": 2, "update_proj_gap": 0}, ValueError, r"update_proj_gap must be >= 1, got 0"),
    ({"rank": 2, "proj_type": "full"}, ValueError, r"proj_type must be one of .*'full'"),
    ({"rank": 2, "svd": "fast"}, ValueError, r"svd must be one of .*'fast'"),
    ({"rank": 2, "scale": -1.0}, ValueError, r"scale must be > 0.0, got -1\.0"),
])
def test_bad_group_settings(group, err, pattern):
    with pytest.raises(err, match=pattern):
        galore.GaLoreAdamW([{"params": [_param(8, 6)], **group}])


def test_1d_parameter_in_projected_group_names_it():
    with pytest.raises(ValueError, match=r"parameter my\.bias has shape \(8,\)"):
        galore.GaLoreAdamW([{"params": [("w", _param(8, 6)), ("my.bias", _param(8))], "rank": 2}])


def test_unnamed_parameter_is_named_by_position():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has shape \(8,\)"):
        galore.GaLoreAdamW([{"params": [_param(8, 6), _param(8)], "rank": 2}])


@pytest.mark.parametrize("kwargs,err,pattern", [
    ({"lr": -1.0}, ValueError, r"lr must be >= 0.0, got -1\.0"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be < 1.0, got 1\.0"),
    ({"betas": 0.9}, TypeError, r"betas must be a tuple"),
    ({"eps": float("nan")}, ValueError, r"eps must be finite"),
    ({"weight_decay": "0.1"}, TypeError, r"weight_decay must be a real number, got '0\.1'"),
])
def test_bad_hyperparameters(kwargs, err, pattern):
    with pytest.raises(err, match=pattern):
        galore.GaLoreAdamW([_param(4, 4)], **kwargs)


def test_adamw8bit_rejects_projected_groups():
    with pytest.raises(ValueError, match="AdamW8bit does not project"):
        galore.AdamW8bit([{"params": [_param(8, 6)], "rank": 2}])


def test_adafactor_lr_options_are_checked():
    with pytest.raises(ValueError, match=r"lr=0\.1 cannot be combined with relative_step=True"):
        galore.GaLoreAdafactor([_param(4, 4)], lr=0.1)
    with pytest.raises(ValueError, match="lr=None needs relative_step=True"):
        galore.GaLoreAdafactor([_param(4, 4)], relative_step=False)
    # per param group too: a group's own lr under the default relative_step was once silently ignored, and a group
    # with relative_step=False and no lr failed at the first step() with a bare TypeError
    with pytest.raises(ValueError, match=r"param group 1: lr=0\.5 cannot be combined with relative_step=True"):
        galore.GaLoreAdafactor([{"params": [_param(4, 4)]}, {"params": [_param(3, 3)], "lr": 0.5}])
    with pytest.raises(ValueError, match="param group 1: lr=None needs relative_step=True"):
        galore.GaLoreAdafactor([{"params": [_param(4, 4)]}, {"params": [_param(3, 3)], "relative_step": False}])
    with pytest.raises(ValueError, match="param group 1: warmup_init=True requires relative_step=True"):
        galore.GaLoreAdafactor([{"params": [_param(4, 4)], "lr": 1e-3, "relative_step": False},
                                {"params": [_param(3, 3)], "warmup_init": True, "lr": 1e-3, "relative_step": False}])


def test_load_state_dict_checks_the_groups_it_brings_and_keeps_the_optimizer_on_refusal():
    """The saved groups replace the live ones: a GaLore state loaded into AdamW8bit made it project, and rank=0 loaded
    and then never updated (a reviewer's repro). Both are refused, and the optimizer is left as it was."""
    w = _param(8, 6)
    w.grad = torch.randn(8, 6)
    plain = galore.AdamW8bit([w], lr=1e-2)
    before = plain.state_dict()
    projecting = galore.GaLoreAdamW8bit([{"params": [w], "rank": 2}], lr=1e-2)
    with pytest.raises(ValueError, match=r"state_dict: AdamW8bit does not project; param group 0 has rank=2"):
        plain.load_state_dict(projecting.state_dict())
    assert plain.state_dict() == before and "rank" not in plain.param_groups[0]
    assert plain.param_groups[0]["params"][0] is w
    bad = galore.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    sd = bad.state_dict()
    sd["param_groups"][0]["rank"] = 0
    with pytest.raises(ValueError, match=r"state_dict: param group 0: rank must be >= 1, got 0"):
        bad.load_state_dict(sd)
    assert bad.param_groups[0]["rank"] == 2
    start = w.detach().clone()
    bad.step()  # still the working optimizer it was
    assert bad.state[w]["step"] == 1 and not torch.equal(w.detach(), start)


def test_a_projected_group_whose_parameters_were_replaced_is_named_not_a_key_error():
    """DeepSpeed ZeRO swaps a group's matrices for one flat 1-D partition after the optimizer is built (the trainer
    refuses galore under deepspeed; this is the optimizer's own guard)."""
    w = _param(8, 6)
    opt = galore.GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    flat = torch.nn.Parameter(w.detach().reshape(-1).clone())
    flat.grad = torch.randn(48)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match=r"GaLoreAdamW: a projected param group \(rank=2\) holds a tensor of shape "
                                         r"\(48,\) that is not one of the matrices it was built with"):
        opt.step()
