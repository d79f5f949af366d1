"""``torch.compile`` of models built from the fused layer: no graph breaks (dropout included), and the compiled model
draws the same dropout seeds, in the same order, as the eager one, so it computes the same outputs and gradients.
CPU; the backend is the default choice (the C++ ops where built)."""
import pytest
import torch
from torch import nn

import lorafusion
from lorafusion import compile_ops
from lorafusion.function import fused_lora_linear


class QKV(nn.Module):
    """Three fused layers reading the same input (as attention's projections), then one more on their sum."""

    def __init__(self, d, p, bias=True):
        super().__init__()
        self.q, self.k, self.v = (lorafusion.FusedLoRALinear(nn.Linear(d, d, bias=bias), 4, 8, dropout=p)
                                  for _ in range(3))
        self.o = lorafusion.FusedLoRALinear(nn.Linear(d, 24, bias=bias), 6, 12, dropout=p)
        for layer in (self.q, self.k, self.v, self.o):
            nn.init.normal_(layer.lora_B)  # B = 0 would hide the adapter path

    def forward(self, x):
        return self.o(torch.nn.functional.gelu(self.q(x) + self.k(x) * self.v(x)))


def _run(model, x, seed, params=None):
    """Output and every gradient (x's included) of one forward + backward after ``torch.manual_seed(seed)``;
    ``params``: the module whose parameters to read (the eager one under a compiled wrapper)."""
    params = params or model
    params.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    return y.detach(), grads, (x.grad.clone() if x.requires_grad else None)


def _fresh(p, bias=True, d=32, seed=0):
    torch.manual_seed(seed)
    return QKV(d, p, bias).train()


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_compiled_model_has_no_graph_breaks(p):
    torch._dynamo.reset()
    explain = torch._dynamo.explain(_fresh(p))(torch.randn(2, 5, 32, requires_grad=True))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


@pytest.mark.parametrize("bias,shape,x_grad", [(True, (2, 7, 32), True), (False, (9, 32), False)])
def test_aot_eager_compiled_model_matches_eager_bit_for_bit(bias, shape, x_grad):
    """Same seeds in the same order: q, k and v read one input, so an op the compiler could merge would give them one
    mask and change the result; each forward draws four seeds (one per layer)."""
    model = _fresh(0.25, bias)
    x = torch.randn(*shape, requires_grad=x_grad)
    want_y, want_g, want_dx = _run(model, x, seed=11)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = int(compile_ops.DRAW_STATE)
    for seed in (11, 11, 12):  # twice the same seed (reproducible), then another (a different mask)
        got_y, got_g, got_dx = _run(compiled, x, seed, model)
        same = torch.equal(got_y, want_y)
        assert same == (seed == 11), seed
        if seed == 11:
            assert got_g.keys() == want_g.keys() and all(torch.equal(got_g[n], want_g[n]) for n in want_g)
            assert (got_dx is None) == (want_dx is None) and (got_dx is None or torch.equal(got_dx, want_dx))
    assert int(compile_ops.DRAW_STATE) - before == 3 * 4


def test_inductor_compiled_model_matches_eager():
    model = _fresh(0.1)
    x = torch.randn(3, 6, 32, requires_grad=True)
    want_y, want_g, want_dx = _run(model, x, seed=5)
    torch._dynamo.reset()
    got_y, got_g, got_dx = _run(torch.compile(model, fullgraph=True), x, 5, model)
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-5)


def test_compiled_functional_call_with_a_fixed_seed_above_2_63():
    """A caller's seed (here above 2**63 - 1, passed to the ops as its two's complement) gives the eager mask."""
    torch.manual_seed(3)
    x, W, b = torch.randn(10, 16), torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    seed = (1 << 63) + 12345

    def f(x, A, B):
        return fused_lora_linear(x, W, b, A, B, 0.5, p=0.5, seed=seed)

    want = f(x, A, B)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, A, B)
    assert torch.equal(got, want)
    assert not torch.equal(want, fused_lora_linear(x, W, b, A, B, 0.5, p=0.5, seed=seed + 1))


def test_fake_implementations_match_the_ops():
    """The ops' fake (meta) implementations agree with the real ones on shapes, dtypes and strides."""
    x, W, b = torch.randn(9, 12), torch.randn(10, 12), torch.randn(10)
    A, B, dy = torch.randn(3, 12), torch.randn(10, 3), torch.randn(9, 10)
    seed = torch.tensor(7, dtype=torch.int64)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lorafusion.fused_linear_forward.default, (x, W, b, A, B, 0.5, seed, 0.1, ""),
                          test_utils=checks)
    _, S = torch.ops.lorafusion.fused_linear_forward(x, W, None, A, B, 0.5, seed, 0.1, "")
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.lorafusion.fused_linear_backward.default,
                              (dy, x, W, A, B, S, 0.5, seed, 0.1, need_dx, ""), test_utils=checks)
    torch.library.opcheck(torch.ops.lorafusion.draw_dropout_seed.default, (x, torch.zeros(1, dtype=torch.int64)),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_patched_peft_llama_has_no_graph_breaks_and_matches_eager():
    """A PEFT LoRA model (tiny Llama, every linear layer, dropout 0.1) patched to the fused layers compiles to one
    graph with no break (while the seed was drawn by ``.item()`` in traced code it broke 24 times), and the compiled
    loss and adapter gradients equal eager's."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                             target_modules="all-linear"))
    lorafusion.patch_peft(model)
    model.train()
    ids = torch.randint(0, 64, (2, 16))

    def loss_and_grads(step):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = step(ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    want_loss, want_g = loss_and_grads(step)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    got_loss, got_g = loss_and_grads(torch.compile(step, backend="aot_eager"))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got_g.keys() == want_g.keys() and len(want_g) == 28  # 14 LoRA layers x (A, B)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6)


def test_compiled_under_cpu_autocast_matches_eager():
    """Inside ``torch.autocast`` (bf16 on CPU) the traced layer casts as the eager one does: same output, dtype and
    gradients."""
    model = _fresh(0.1)
    x = torch.randn(4, 32, requires_grad=True)

    def run(f):
        model.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(xx)
        y.float().sum().backward()
        return y, xx.grad, model.q.lora_A.grad.clone(), model.o.lora_B.grad.clone()

    want = run(model)
    torch._dynamo.reset()
    got = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert want[0].dtype == got[0].dtype == torch.bfloat16
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_on_cuda_matches_eager(dtype):
    """On a GPU (the default backend, Triton): the traced draw advances the CUDA generator as eager does, so the
    masks agree; values within the run-to-run noise of the kernels' atomic reductions."""
    model = _fresh(0.1, d=64).to("cuda", dtype)
    x = torch.randn(3, 50, 64, device="cuda", dtype=dtype, requires_grad=True)
    want_y, want_g, want_dx = _run(model, x, seed=9)
    torch._dynamo.reset()
    got_y, got_g, got_dx = _run(torch.compile(model, backend="aot_eager", fullgraph=True), x, 9, model)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_y, want_y, **tol)
    torch.testing.assert_close(got_dx, want_dx, **tol)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], **tol)


def test_compiled_cpu_layers_ignore_a_bad_triton_gemm_placement(monkeypatch):
    """A bad $LORAFUSION_TRITON_GEMM concerns the Triton backend only, traced as in eager: the compiled model on the
    CPU backend runs and matches eager."""
    monkeypatch.setenv("LORAFUSION_TRITON_GEMM", "cublas")
    model = _fresh(0.1)
    x = torch.randn(5, 32, requires_grad=True)
    want_y, want_g, want_dx = _run(model, x, seed=3)
    torch._dynamo.reset()
    got_y, got_g, got_dx = _run(torch.compile(model, backend="aot_eager", fullgraph=True), x, 3, model)
    assert torch.equal(got_y, want_y) and torch.equal(got_dx, want_dx)
    assert all(torch.equal(got_g[n], want_g[n]) for n in want_g)
