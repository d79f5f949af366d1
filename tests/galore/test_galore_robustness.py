"""Optimizer objects you can trust: copies that step, refused groups that leave nothing behind, one layer-wise owner
per parameter, state that lands on the parameters it was saved for, and bad input named."""

import copy
import gc
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import galore
from galore_test_helpers import fresh_seed, galore_groups, make_batches, make_model, max_param_rel_err, train


@pytest.mark.parametrize("cls", [galore.AdamW8bit, galore.GaLoreAdamW8bit])
def test_8bit_optimizers_survive_deepcopy_and_pickle(cls):
    pytest.importorskip("bitsandbytes")
    seed = fresh_seed()
    batches = make_batches(seed, 6)
    model = make_model(seed)
    groups = (galore_groups(model) if cls is galore.GaLoreAdamW8bit else model.parameters())
    opt = cls(groups, lr=3e-3, min_8bit_size=64)
    train(model, opt, batches[:3])
    for clone in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        m2, o2 = clone
        assert o2._min_8bit_size == 64
        train(m2, o2, batches[3:])
        assert o2.state[m2.up.weight]["state1"].dtype == torch.uint8
    train(model, opt, batches[3:])
    assert max_param_rel_err(m2, model) < 1e-6, f"seed={seed}"


def test_a_refused_param_group_is_not_kept():
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.zeros(6))
    opt = galore.GaLoreAdamW([w], lr=1e-3)
    with pytest.raises(ValueError, match=r"param group 1: lr must be >= 0.0, got -1.0"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    with pytest.raises(ValueError, match=r"rank=9 is larger than the smaller side"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 9})
    assert len(opt.param_groups) == 1 and b not in opt._param_names
    b.grad = torch.ones(6)
    opt.step()
    assert torch.equal(b, torch.zeros(6))  # not trained by the refused group


def test_a_dropped_layerwise_optimizer_stops_stepping_and_two_live_ones_are_refused():
    model = make_model(fresh_seed())
    x, y = make_batches(1, 1)[0]
    old = galore.GaLoreAdamW(galore_groups(model), lr=1e-2)
    old.enable_layerwise()
    with pytest.raises(ValueError, match="already stepped by another live layer-wise optimizer"):
        galore.GaLoreAdamW(galore_groups(model), lr=0.0).enable_layerwise()
    del old
    gc.collect()
    new = galore.GaLoreAdamW(galore_groups(model), lr=0.0, weight_decay=0.0)  # a rebuilt optimizer, lr 0
    new.enable_layerwise()
    before = copy.deepcopy(model)
    ((model(x) - y) ** 2).mean().backward()
    new.step()
    assert max_param_rel_err(model, before) == 0.0  # the dropped optimizer (lr 1e-2) no longer steps
    assert len(new.state) == len([p for p in model.parameters()])


def test_layerwise_add_param_group_refused_for_a_parameter_owned_elsewhere_leaves_nothing():
    model = make_model(fresh_seed())
    a = galore.GaLoreAdamW([model.up.bias], lr=1e-2)
    a.enable_layerwise()
    b = galore.GaLoreAdamW([model.down.bias], lr=0.0)
    b.enable_layerwise()
    with pytest.raises(ValueError, match="already stepped by another live layer-wise optimizer"):
        b.add_param_group({"params": [model.head.weight, model.up.bias]})
    assert len(b.param_groups) == 1 and model.head.weight not in b._layerwise["handles"]
    del a
    gc.collect()
    x, y = make_batches(2, 1)[0]
    before = model.up.bias.detach().clone()
    ((model(x) - y) ** 2).mean().backward()
    b.step()
    assert torch.equal(model.up.bias, before)  # b never took the refused group


def test_state_dict_of_other_named_parameters_is_refused():
    model = nn.Sequential(nn.Linear(32, 8), nn.Linear(16, 32))
    named = list(model.named_parameters())
    opt = galore.GaLoreAdamW([{"params": named[0::2], "rank": 4}, {"params": named[1::2]}], lr=1e-3)
    sd = opt.state_dict()
    swapped = galore.GaLoreAdamW([{"params": [named[2], named[0]], "rank": 4}, {"params": named[1::2]}], lr=1e-3)
    with pytest.raises(ValueError, match=r"param group 0 lists parameters \['0.weight', '1.weight'\]"):
        swapped.load_state_dict(sd)


def test_sparse_gradient_in_layerwise_mode_is_named():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = galore.GaLoreAdamW(emb.parameters(), lr=1e-3)
    opt.enable_layerwise()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(param_groups\[0\]\['params'\]\[0\]\)"):
        emb(torch.tensor([1, 2])).sum().backward()
    assert "step" not in opt.state[emb.weight]


@pytest.mark.parametrize("make, match", [
    (lambda p: galore.GaLoreAdafactor(p, lr=1e-3, relative_step=False, scale_parameter="no"),
     "scale_parameter must be True or False"),
    (lambda p: galore.GaLoreAdafactor(p, lr=1e-3, relative_step=False, decay_rate=0.5), "decay_rate must be <= 0.0"),
    (lambda p: galore.build_optimizer(nn.Linear(8, 8), "galore_adamw", target_modules=[0, 1]), "target_modules must"),
    (lambda p: galore.build_optimizer(nn.Linear(8, 8), "adamw", accumulation_steps=0), "accumulation_steps must"),
    (lambda p: galore.GaLoreAdamW(p).enable_layerwise(distributed=True), "needs an initialised torch.distributed"),
])
def test_bad_optimizer_input_is_named(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make([nn.Parameter(torch.randn(4, 4))])


# ------------------------------------------------------------------ layer-wise DDP with parameters unused on a rank
class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(12, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 6), nn.Linear(16, 6)])

    def forward(self, x, head):
        return self.heads[head](torch.tanh(self.trunk(x)))


def _groups(model):
    # one basis for the 4 steps: a refresh carries the moments over to a basis whose SVD signs a last-bit difference
    # between the reduced and the one-process gradient can flip (seed 233 parted the runs with update_proj_gap 2)
    return [{"params": [model.trunk.weight], "rank": 4, "update_proj_gap": 5, "scale": 1.0},
            {"params": [model.trunk.bias, *model.heads.parameters()]}]


def _data(seed, steps):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 8, 12, generator=g), torch.randn(2, 8, 6, generator=g)) for _ in range(steps)]


def _unused_worker(rank, init_file, seed, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(seed)
        model = _TwoHeads()
        opt = galore.GaLoreAdamW(_groups(model), lr=1e-2)
        opt.enable_layerwise()
        for x, y in _data(seed, 4):  # rank r uses head r only: the other head has no gradient here
            ((model(x[rank], rank) - y[rank]) ** 2).mean().backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_layerwise_ddp_with_a_parameter_unused_on_one_rank_equals_one_process():
    """Each rank's gradient of a head it did not use counts as zero in the average (as DDP's
    find_unused_parameters does), so both replicas equal one process stepping on the mean of the two losses."""
    seed = fresh_seed()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_unused_worker, args=(os.path.join(out_dir, "init"), seed, out_dir), nprocs=2, join=True)
        got = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in (0, 1)]
    torch.manual_seed(seed)
    ref = _TwoHeads()
    opt = galore.GaLoreAdamW(_groups(ref), lr=1e-2)
    for x, y in _data(seed, 4):
        sum(((ref(x[r], r) - y[r]) ** 2).mean() for r in (0, 1)).div(2).backward()
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        for r in (0, 1):
            assert torch.allclose(got[r][k], v, rtol=1e-5, atol=1e-6), f"seed={seed} rank {r} {k}"
