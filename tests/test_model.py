from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tune_gpt.model import GPT, GPTConfig, Linear


def small_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


def test_forward_shapes_and_loss_near_uniform_at_init():
    m = small_model()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = m(x, torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3
    logits, loss = m(x)
    assert logits.shape == (3, 1, 50) and loss is None


def test_embeddings_are_tied_and_counted_once():
    m = small_model()
    assert m.lm_head.weight is m.wte.weight
    per_block = 12 * 32 * 32 + 2 * 32  # attn 4C^2 + mlp 8C^2 + two LayerNorm weights
    expected = 50 * 32 + 2 * per_block + 32  # wte (shared with lm_head) + blocks + ln_f
    assert m.num_params() == expected
    assert m.num_params(non_embedding=False) == expected + 16 * 32


def test_flops_per_token_formula():
    m = small_model()
    assert m.flops_per_token() == 6 * m.num_params() + 12 * 2 * 32 * 16


def test_attention_is_causal():
    m = small_model().eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    a, _ = m(x, x)
    b, _ = m(y, y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_gpt2_style_init_scales_residual_projections():
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=2, n_embd=256))
    std = m.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.002
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_decay_groups_split_matrices_from_vectors():
    m = small_model(bias=True)
    decay, no_decay = m.optim_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in m.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_generate_appends_tokens_beyond_the_context():
    m = small_model().eval()
    out = m.generate(torch.zeros((1, 1), dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 21)


def test_generate_never_samples_suppressed_ids():
    m = small_model().eval()
    out = m.generate(torch.zeros((4, 1), dtype=torch.long), 30, generator=torch.Generator().manual_seed(0),
                     suppress=[0, 1, 2])
    assert not torch.isin(out[:, 1:], torch.tensor([0, 1, 2])).any()


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_products_keep_float32_results_and_gradients_close_to_exact(bias):
    torch.manual_seed(0)
    lin = Linear(96, 160, bias=bias)
    x = torch.randn(4, 24, 96, requires_grad=True)
    g = torch.randn(4, 24, 160)
    exact_y = F.linear(x, lin.weight, lin.bias)
    exact = torch.autograd.grad(exact_y, [x, *lin.parameters()], g)
    lin.bf16_products = True
    y = lin(x)
    got = torch.autograd.grad(y, [x, *lin.parameters()], g)
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in got)
    assert torch.get_float32_matmul_precision() == "highest"  # restored after forward and backward
    for a, b in zip((y, *got), (exact_y, *exact)):
        assert a.shape == b.shape
        assert (a - b).norm() <= 1e-2 * b.norm()  # bfloat16 operands: ~3 significant digits per product


def test_bf16_products_can_be_switched_on_every_linear_layer_without_touching_the_weights():
    m = small_model(bias=True)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1 and all(isinstance(mod, Linear) for mod in linears)  # lm_head included
    keys = list(m.state_dict())
    x = torch.randint(0, 50, (3, 16))
    _, exact = m(x, x)
    m.set_bf16_products(True)
    assert all(mod.bf16_products for mod in linears)
    _, loss = m(x, x)
    loss.backward()
    assert abs(loss.item() - exact.item()) < 1e-2 and list(m.state_dict()) == keys
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.set_bf16_products(False)
    assert m(x, x)[1].item() == exact.item()


def test_bf16_products_switch_is_restored_by_the_last_thread_out():
    import threading

    from tune_gpt import model as model_mod

    before = model_mod._get_mkldnn_precision()
    inside, leave = threading.Event(), threading.Event()

    def other_thread():
        with model_mod._bf16_products():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other_thread)
    t.start()
    assert inside.wait(10)
    with model_mod._bf16_products():
        assert model_mod._get_mkldnn_precision() == model_mod._BF16
    assert model_mod._get_mkldnn_precision() == model_mod._BF16  # the other thread is still inside
    leave.set()
    t.join(10)
    assert model_mod._get_mkldnn_precision() == before
    assert torch.get_float32_matmul_precision() == "highest"


def test_bf16_products_step_aside_for_autocast():
    torch.manual_seed(0)
    lin = Linear(32, 16)
    lin.bf16_products = True
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16  # autocast's own bfloat16 matmul, not the float32-in/out one
    y.float().sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
