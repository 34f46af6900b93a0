from __future__ import annotations

import torch

from tune_gpt.model import GPT, GPTConfig


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
