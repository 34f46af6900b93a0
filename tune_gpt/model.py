"""The GPT decoder: pre-LayerNorm blocks, fused-QKV causal attention, GELU MLP.

No I/O and no logging here. Shapes in comments: B batch, T time, C width,
H heads, V vocabulary.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


_bf16_lock = threading.Lock()
_bf16_users = 0  # threads inside `_bf16_products`; the setting is process-wide
_bf16_saved: str | None = None


def _get_mkldnn_precision() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


def _set_mkldnn_precision(value: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = value


if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):  # torch < 2.9: the global switch
    _get_mkldnn_precision, _set_mkldnn_precision = torch.get_float32_matmul_precision, torch.set_float32_matmul_precision
_BF16 = "bf16" if _get_mkldnn_precision is not torch.get_float32_matmul_precision else "medium"


@contextmanager
def _bf16_products() -> Iterator[None]:
    """oneDNN's float32 matmuls inside multiply in bfloat16 (fp32 accumulation, fp32 in and out).

    The switch is process-wide: the first thread in sets it, the last one out restores it (a Tune
    actor can hold a stopped trial's thread next to the next trial's)."""
    global _bf16_users, _bf16_saved
    with _bf16_lock:
        if _bf16_users == 0:
            _bf16_saved = _get_mkldnn_precision()
            _set_mkldnn_precision(_BF16)
        _bf16_users += 1
    try:
        yield
    finally:
        with _bf16_lock:
            _bf16_users -= 1
            if _bf16_users == 0:
                _set_mkldnn_precision(_bf16_saved)


class _Bf16ProductLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and both gradient matmuls under `_bf16_products`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        with _bf16_products():
            return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        with _bf16_products():
            gx = g @ w if need_x else None  # (..., in)
            gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None  # (out, in)
        gb = g2.sum(0) if ctx.has_bias and need_b else None
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear whose matmuls can multiply in bfloat16 (`bf16_products`; off by default).

    Inputs, outputs, weights, gradients and accumulation stay float32; only the
    products' operands are rounded to bfloat16, which oneDNN runs on AMX /
    AVX512-BF16 at 2-2.5x the float32 GEMM rate for this model's shapes (on a CPU
    without them oneDNN emulates bfloat16, slowly). Per layer,
    not through a global ``torch.set_float32_matmul_precision("medium")``: that
    also reaches the CPU flash-attention kernel's block GEMMs, which then run ~10x
    slower (a whole step: 59 ms against 30 ms in float32).
    """

    bf16_products: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16_products and x.dtype == torch.float32 and not _autocast(x.device.type):
            return _Bf16ProductLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (it then picks the matmul dtype itself)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_buffer("pos", torch.arange(cfg.block_size), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_bf16_products(self, on: bool) -> None:
        """Multiply in bfloat16 in every linear layer (see `Linear`) or not."""
        for mod in self.modules():
            if isinstance(mod, Linear):
                mod.bf16_products = on

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B estimate."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(self.pos[:T]))  # (B, T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): only the last position
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices (and embeddings) decay; biases and norms do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        suppress: list[int] | None = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); `suppress` ids are never sampled."""
        for _ in range(max_new_tokens):
            ctx = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(ctx)
            logits = logits[:, -1, :] / max(temperature, 1e-6)  # (B, V)
            if suppress:
                logits[:, suppress] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
