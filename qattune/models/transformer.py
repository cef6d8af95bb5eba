"""The one decoder-only Transformer behind every qattune model family (Llama 2/3.x, SmolLM2, Qwen2.5).

Layout, chosen so the rest of qattune can work on it generically:
- `model.layers` is an `nn.ModuleList` of `TransformerBlock`s: FSDP2 and activation checkpointing wrap
  one block at a time.
- every projection is a plain `nn.Linear` (`attn.q_proj/k_proj/v_proj/o_proj`, `mlp.gate_proj/up_proj/
  down_proj`, `output`), so quantization can find and swap them.
- with tied embeddings, `output.weight` *is* `tok_embeddings.weight` (one parameter); the tie survives
  `.to()`, `to_empty()` and `load_state_dict(assign=True)`.
- there are no buffers besides the optional KV caches (rotary angles are computed from the positions),
  so building on the meta device then `to_empty()` + loading a state dict gives a complete model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from qattune.errors import QattuneError
from qattune.models.rope import RopeConfig, apply_rotary, rotary_cos_sin


@dataclass(frozen=True)
class TransformerConfig:
    """Every size and option of a model; `asdict(config)` is the keyword set of `qattune.models.llama`."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def rope(self) -> RopeConfig:
        return RopeConfig(
            head_dim=self.head_dim,
            base=self.rope_base,
            scaling_factor=self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_seq_len=self.rope_original_max_seq_len,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the (learned) scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past positions for one attention layer, [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` [B, kv_heads, S, D] at positions `input_pos` [B, S]; return the whole cache."""
        batch = k.shape[0]
        rows = torch.arange(batch, device=k.device).unsqueeze(1)
        k_cache, v_cache = self.k[:batch], self.v[:batch]
        # Advanced indices on dims 0 and 2 put [B, S] first: the target is [B, S, kv_heads, D].
        k_cache[rows, :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
        return k_cache, v_cache

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA over [B, heads, S, D] q and [B, kv_heads, T, D] k/v; mask None means causal (S == T)."""
    groups = q.shape[1] // k.shape[1]
    # Only the flash kernel reads grouped k/v directly; everywhere else SDPA would fall back to the
    # slow O(S^2)-memory math kernel, so expand k/v to one head per query head instead.
    native_gqa = (
        groups > 1 and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    )
    if groups > 1 and not native_gqa:
        b, h, t, d = k.shape
        k = k.unsqueeze(2).expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
        v = v.unsqueeze(2).expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=native_gqa)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.embed_dim, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.embed_dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.embed_dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.embed_dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor],
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        out = _attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, embed_dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, intermediate_dim, bias=False)
        self.up_proj = nn.Linear(embed_dim, intermediate_dim, bias=False)
        self.down_proj = nn.Linear(intermediate_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + mlp(mlp_norm(.))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = FeedForward(config.embed_dim, config.intermediate_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.mlp_norm(h))


INIT_STD = 0.02
"""Standard deviation of fresh weights (`init_weights`, and a tied embedding), as Hugging Face's initializer_range."""


class Transformer(nn.Module):
    """Token embedding, `num_layers` blocks, final RMSNorm, output head."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.output = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # nn.Embedding's N(0, 1) would make the head's first logits about sqrt(embed_dim) times too large
            # (a from-scratch loss of 58 instead of ln(vocab)); a checkpoint's weights replace it anyway
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=INIT_STD)
            self.tie_weights()

    # --- tied embeddings -------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Make the output head use the token embedding's weight parameter."""
        self.output.weight = self.tok_embeddings.weight

    def weights_tied(self) -> bool:
        return getattr(self.output, "weight", None) is self.tok_embeddings.weight

    def _apply(self, fn: Any, recurse: bool = True) -> "Transformer":
        # nn.Module._apply may replace each module's parameters separately (e.g. to_empty from meta),
        # which would silently untie the head; keep whatever tie existed before.
        tied = self.weights_tied()
        super()._apply(fn, recurse)
        if tied:
            self.tie_weights()
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's; with tied weights `output.weight` may be absent (it is the embedding)."""
        tied = self.weights_tied()
        if tied and "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
            state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if tied:
            self.tie_weights()
        return result

    # --- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = INIT_STD) -> None:
        """Fresh weights (training from scratch, or after `to_empty` without a checkpoint)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # --- KV caches -------------------------------------------------------------------------------------
    def setup_caches(
        self,
        batch_size: int,
        max_seq_len: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Give every attention layer a KV cache; forward then needs `input_pos` and writes there."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch_size,
                max_seq_len or self.config.max_seq_len,
                self.config.num_kv_heads,
                self.config.head_dim,
                dtype or weight.dtype,
                device or weight.device,
            )

    def reset_caches(self) -> None:
        """Zero the caches (a new generation), keeping their memory."""
        for layer in self.layers:
            if layer.attn.kv_cache is not None:
                layer.attn.kv_cache.reset()

    def remove_caches(self) -> None:
        """Drop the caches and go back to training-style forward passes."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    def caches_are_enabled(self) -> bool:
        return len(self.layers) > 0 and self.layers[0].attn.kv_cache is not None

    # --- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab] for `tokens` [B, S].

        input_pos: position ids, [B, S] or [S] (default 0..S-1); with packed sequences they restart at
            each document. With KV caches enabled they are required and say where keys/values are written.
        mask: optional boolean "may attend" mask [B, S, S], or [B, S, cache_len] with caches; default causal
            (with caches: causal by position over the whole cache).
        """
        batch, seq = tokens.shape
        caching = self.caches_are_enabled()
        if not caching and seq > self.config.max_seq_len:
            raise QattuneError(
                f"a sequence of {seq} tokens is longer than the model's max_seq_len={self.config.max_seq_len}: lower "
                "the data's max_seq_len (e.g. dataset.max_seq_len), or raise the model's if it handles longer inputs")
        if input_pos is None:
            if caching:
                raise ValueError("input_pos is required when KV caches are enabled")
            input_pos = torch.arange(seq, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos.unsqueeze(0).expand(batch, seq)
        if mask is None and caching:
            cache_pos = torch.arange(self.layers[0].attn.kv_cache.max_seq_len, device=tokens.device)
            mask = cache_pos.view(1, 1, -1) <= input_pos.unsqueeze(-1)
        attn_mask = None if mask is None else mask.unsqueeze(1)  # broadcast over heads

        cos, sin = rotary_cos_sin(self.config.rope, input_pos)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, input_pos)
        return self.output(self.norm(h))
