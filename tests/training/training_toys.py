"""Tiny model, data and quantizer stand-ins for the training-loop tests (2 layers, width 64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qattune.data import Sample, TokenizedDataset

VOCAB = 32


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyLM(nn.Module):
    """tokens [B, S] -> logits [B, S, V]; `input_pos` position ids, `mask` bool [B, S, S] may-attend."""

    def __init__(self, dim: int = 64, n_layers: int = 2, heads: int = 4, max_seq_len: int = 64, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(max_seq_len, dim)
        self.layers = nn.ModuleList(TinyBlock(dim, heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens, *, input_pos=None, mask=None):
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.tok(tokens) + self.pos(input_pos)
        for layer in self.layers:
            x = layer(x, mask)
        return self.output(self.norm(x))


def make_model(seed: int = 0, dropout: float = 0.0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(dropout=dropout)


def learnable_samples(n: int, seed: int = 1, min_len: int = 5, max_len: int = 16, partial_mask: bool = True) -> list[Sample]:
    """Sequences following t -> (3t + 1) mod VOCAB from a random start, of random lengths; with
    `partial_mask`, a random prefix is not trained (so micro-batches differ in token counts)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        tokens = [int(torch.randint(0, VOCAB, (1,), generator=g))]
        for _ in range(length - 1):
            tokens.append((3 * tokens[-1] + 1) % VOCAB)
        skip = int(torch.randint(0, length // 2, (1,), generator=g)) if partial_mask else 0
        samples.append(Sample.from_mask(tokens, [i >= skip for i in range(length)]))
    return samples


def learnable_dataset(n: int, seed: int = 1, **kwargs) -> TokenizedDataset:
    return TokenizedDataset(learnable_samples(n, seed, **kwargs), pad_id=0)


class RecordingQuantizer:
    """Quantizer stand-in: `set_fake_quant` stores the state on the model and records each call."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def set_fake_quant(self, model: nn.Module, enabled: bool) -> None:
        model.fake_quant_enabled = enabled
        self.calls.append(enabled)


class StateProbe:
    """Step hook that records (step, model.fake_quant_enabled) after the hooks before it ran."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[tuple[int, bool]] = []

    def on_step_start(self, step: int) -> None:
        self.seen.append((step, getattr(self.model, "fake_quant_enabled", None)))
