"""State-dict adapters: how each model family names and lays out its weights in other formats.

One small class per family, registered in `MODEL_TYPES` (adding a family = one subclass + one line).
An adapter converts between qattune's parameter names and
- Hugging Face `transformers` (`model.layers.N.self_attn.q_proj.weight`, config.json),
- Meta's reference code (`consolidated.*.pth`: `layers.N.attention.wq.weight`, params.json),
- GGUF / llama.cpp (`blk.N.attn_q.weight`, `llama.*` metadata),
and between qattune's `TransformerConfig` and each format's config.

Rotary layout: qattune and Hugging Face pair q/k features `j` and `j + head_dim/2` ("half-split").
Meta, and llama.cpp's `llama` architecture, pair `2j` and `2j+1` ("interleaved"); their q/k rows (weights
and biases) are permuted on the way in and out. llama.cpp's `qwen2` architecture uses the half-split
(NeoX) rotation, so its tensors are stored as Hugging Face has them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import numpy as np
import torch

from qattune.errors import QattuneError
from qattune.models.rope import RopeConfig, inverse_frequencies
from qattune.models.transformer import TransformerConfig

FORMATS = ("hf", "meta", "gguf")

# (qattune name, Hugging Face name, Meta name, GGUF name); "{i}" is the layer index; None = not in that format.
_TOP_LEVEL = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight", "output.weight"),
)
_PER_LAYER = (
    ("attn_norm.weight", "input_layernorm.weight", "attention_norm.weight", "attn_norm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight", "attention.wq.weight", "attn_q.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight", "attention.wk.weight", "attn_k.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight", "attention.wv.weight", "attn_v.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight", "attention.wo.weight", "attn_output.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight", "feed_forward.w1.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight", "feed_forward.w3.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight", "feed_forward.w2.weight", "ffn_down.weight"),
)
_QKV_BIAS = (
    ("attn.q_proj.bias", "self_attn.q_proj.bias", None, "attn_q.bias"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias", None, "attn_k.bias"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias", None, "attn_v.bias"),
)
_LAYER_PREFIX = {"qattune": "layers.{i}.", "hf": "model.layers.{i}.", "meta": "layers.{i}.", "gguf": "blk.{i}."}
_COLUMN = {"qattune": 0, "hf": 1, "meta": 2, "gguf": 3}
# Tensors some writers add that carry nothing qattune needs (angles are recomputed from the config).
_IGNORED = {"hf": ("rotary_emb.inv_freq",), "meta": ("rope.freqs",), "gguf": ("rope_freqs.weight",)}


def interleaved_to_half_split(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Permute q/k rows from Meta/llama.cpp pairing (2j, 2j+1) to half-split pairing (j, j + d/2)."""
    return w.reshape(num_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_split_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half_split`."""
    return w.reshape(num_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_intermediate_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The SwiGLU width Meta's reference code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_params(dim: int, intermediate_dim: int) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier that make Meta's formula give `intermediate_dim`."""
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_intermediate_dim(dim, multiple_of, None) == intermediate_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
        for multiplier in (1.3, 1.5, 2.0, 1.0):
            if meta_intermediate_dim(dim, multiple_of, multiplier) == intermediate_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    base = int(2 * (4 * dim) / 3)
    return {"multiple_of": 1, "ffn_dim_multiplier": (intermediate_dim + 0.5) / base}


class StateDictAdapter:
    """The Llama layout; subclasses change only what their family does differently."""

    family: ClassVar[str] = "llama"
    hf_model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    gguf_architecture: ClassVar[str] = "llama"
    gguf_interleaved_rotary: ClassVar[bool] = True
    hf_defaults: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
    # Meta params.json has no context length, and "use_scaled_rope" without the factor in older files.
    meta_max_seq_len: ClassVar[int] = 8192
    meta_scaled_max_seq_len: ClassVar[int] = 131_072
    meta_rope_scaling_factor: ClassVar[float] = 8.0

    # --- names -----------------------------------------------------------------------------------------
    def names(self, fmt: str, config: TransformerConfig) -> dict[str, str]:
        """qattune name -> name in `fmt` for every tensor a model of `config` has in that format."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
        rows = _PER_LAYER + (_QKV_BIAS if config.qkv_bias else ())
        col = _COLUMN[fmt]
        mapping = {row[0]: row[col] for row in _TOP_LEVEL}
        for i in range(config.num_layers):
            for row in rows:
                if row[col] is None:
                    raise QattuneError(
                        f"the {fmt} format cannot hold tensor '{row[0]}' of a {self.family} model; "
                        "save it in Hugging Face format instead"
                    )
                mapping[_LAYER_PREFIX["qattune"].format(i=i) + row[0]] = _LAYER_PREFIX[fmt].format(i=i) + row[col]
        return mapping

    def _rotary_heads(self, fmt: str, config: TransformerConfig) -> dict[str, int]:
        """qattune names of q/k tensors that `fmt` stores interleaved -> number of heads in them."""
        if fmt == "hf" or (fmt == "gguf" and not self.gguf_interleaved_rotary):
            return {}
        heads = {}
        for i in range(config.num_layers):
            for proj, n in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
                for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
                    heads[f"layers.{i}.attn.{proj}.{kind}"] = n
        return heads

    # --- state dicts -----------------------------------------------------------------------------------
    def from_format(
        self, fmt: str, state_dict: Mapping[str, torch.Tensor], config: TransformerConfig, source: str
    ) -> dict[str, torch.Tensor]:
        """A `fmt` state dict (from `source`, named in errors) in qattune names and layout."""
        names = self.names(fmt, config)
        to_qattune = {theirs: ours for ours, theirs in names.items()}
        head_output = names["output.weight"]
        unexpected = [k for k in state_dict if k not in to_qattune and not k.endswith(_IGNORED[fmt])]
        if unexpected:
            raise QattuneError(
                f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for a {self.family} "
                f"model with {config.num_layers} layers; check model_type and the config's sizes"
            )
        for theirs in to_qattune:
            if theirs not in state_dict and not (theirs == head_output and config.tie_embeddings):
                if theirs.endswith(".bias") and not any(k.endswith(".bias") for k in state_dict):
                    raise QattuneError(f"{source}: tensor '{theirs}' is missing: the checkpoint has no attention "
                                       f"biases, which {self.family} models have; check model_type")
                raise QattuneError(f"{source}: tensor '{theirs}' is missing; the checkpoint is incomplete")
        out = {to_qattune[k]: v for k, v in state_dict.items() if k in to_qattune}
        if config.tie_embeddings:
            out.pop("output.weight", None)
        for name, heads in self._rotary_heads(fmt, config).items():
            out[name] = interleaved_to_half_split(out[name], heads)
        return out

    def to_format(
        self, fmt: str, state_dict: Mapping[str, torch.Tensor], config: TransformerConfig
    ) -> dict[str, torch.Tensor]:
        """qattune's state dict in `fmt` names and layout (tied heads are left out, except for Meta)."""
        names = self.names(fmt, config)
        sd = dict(state_dict)
        if config.tie_embeddings:
            if fmt == "meta":
                sd["output.weight"] = sd["tok_embeddings.weight"]
            else:
                sd.pop("output.weight", None)
                names.pop("output.weight")
        missing = [k for k in names if k not in sd]
        if missing:
            raise QattuneError(f"cannot save: the model's state dict lacks '{missing[0]}' ({len(missing)} in all)")
        rotary = self._rotary_heads(fmt, config)
        out = {}
        for ours, theirs in names.items():
            tensor = sd[ours]
            out[theirs] = half_split_to_interleaved(tensor, rotary[ours]) if ours in rotary else tensor
        return out

    def from_hf(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig, source: str = "checkpoint"):
        return self.from_format("hf", sd, config, source)

    def to_hf(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        return self.to_format("hf", sd, config)

    def from_meta(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig, source: str = "checkpoint"):
        return self.from_format("meta", sd, config, source)

    def to_meta(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        return self.to_format("meta", sd, config)

    def from_gguf(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig, source: str = "checkpoint"):
        return self.from_format("gguf", sd, config, source)

    def to_gguf(self, sd: Mapping[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
        return self.to_format("gguf", sd, config)

    # --- Hugging Face config.json ----------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], source: str = "config.json") -> TransformerConfig:
        """qattune's config from a config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        self._check_hf_supported(hf, source)
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling: dict[str, Any] = {}
        if rope_type == "llama3":
            scaling = {
                "rope_scaling_factor": float(rope["factor"]),
                "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
                "rope_original_max_seq_len": int(rope.get("original_max_position_embeddings", 8192)),
            }
        elif rope_type != "default":
            raise QattuneError(f"{source}: rope type '{rope_type}' is not supported; qattune supports default, llama3")
        try:
            heads = int(hf["num_attention_heads"])
            return TransformerConfig(
                vocab_size=int(hf["vocab_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                embed_dim=int(hf["hidden_size"]),
                intermediate_dim=int(hf["intermediate_size"]),
                max_seq_len=int(hf.get("max_position_embeddings") or self.hf_defaults["max_position_embeddings"]),
                head_dim=hf.get("head_dim") or None,
                norm_eps=float(hf.get("rms_norm_eps", self.hf_defaults["rms_norm_eps"])),
                rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=self._hf_qkv_bias(hf),
                **scaling,
            )
        except KeyError as err:
            raise QattuneError(f"{source}: required key {err} is missing") from None
        except (ValueError, TypeError) as err:  # e.g. "num_attention_heads": null, "hidden_size": [64]
            raise QattuneError(f"{source}: a size has a value that is not a number ({err}); check the file") from None

    def _check_hf_supported(self, hf: Mapping[str, Any], source: str) -> None:
        if hf.get("hidden_act", "silu") != "silu":
            raise QattuneError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise QattuneError(f"{source}: attention_bias/mlp_bias are not supported for {self.family} models")

    def _hf_qkv_bias(self, hf: Mapping[str, Any]) -> bool:
        return False

    def config_to_hf(
        self, config: TransformerConfig, dtype: torch.dtype, base: Optional[Mapping[str, Any]] = None
    ) -> dict[str, Any]:
        """A config.json for `config`, keeping unrelated keys of `base` (token ids, generation settings).

        Writes both the transformers 4.x keys (rope_theta, rope_scaling, torch_dtype) and the 5.x ones
        (rope_parameters, dtype) so either version loads it.
        """
        out = dict(base or {})
        rope: dict[str, Any] = {"rope_type": "default"}
        if config.rope_scaling_factor is not None:
            rope = {
                "rope_type": "llama3",
                "factor": config.rope_scaling_factor,
                "low_freq_factor": config.rope_low_freq_factor,
                "high_freq_factor": config.rope_high_freq_factor,
                "original_max_position_embeddings": config.rope_original_max_seq_len,
            }
        dtype_name = str(dtype).removeprefix("torch.")
        out.update(
            architectures=[self.hf_architecture],
            model_type=self.hf_model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.embed_dim,
            intermediate_size=config.intermediate_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_position_embeddings=config.max_seq_len,
            rms_norm_eps=config.norm_eps,
            hidden_act="silu",
            tie_word_embeddings=config.tie_embeddings,
            rope_theta=config.rope_base,
            rope_scaling=rope if config.rope_scaling_factor is not None else None,
            rope_parameters={**rope, "rope_theta": config.rope_base},
            torch_dtype=dtype_name,
            dtype=dtype_name,
            **self._hf_extra_config(config),
        )
        return out

    def _hf_extra_config(self, config: TransformerConfig) -> dict[str, Any]:
        return {"attention_bias": False, "mlp_bias": False}

    # --- Meta params.json ------------------------------------------------------------------------------
    def config_from_meta(
        self, params: Mapping[str, Any], vocab_size: int, tied: bool, source: str = "params.json"
    ) -> TransformerConfig:
        """qattune's config from params.json; `vocab_size` and `tied` come from the tensors themselves."""
        try:
            dim = int(params["dim"])
            scaled = bool(params.get("use_scaled_rope", False))
            scaling = {}
            if scaled:
                factor = params.get("rope_scaling_factor", self.meta_rope_scaling_factor)
                scaling = {"rope_scaling_factor": float(factor)}
            return TransformerConfig(
                vocab_size=vocab_size,
                num_layers=int(params["n_layers"]),
                num_heads=int(params["n_heads"]),
                num_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
                embed_dim=dim,
                intermediate_dim=meta_intermediate_dim(
                    dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
                ),
                max_seq_len=self.meta_scaled_max_seq_len if scaled else self.meta_max_seq_len,
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_base=float(params.get("rope_theta", 10000.0)),
                tie_embeddings=tied,
                **scaling,
            )
        except KeyError as err:
            raise QattuneError(f"{source}: required key {err} is missing") from None
        except ValueError as err:
            raise QattuneError(f"{source}: {err}") from None

    def config_to_meta(self, config: TransformerConfig) -> dict[str, Any]:
        """params.json for `config` (Meta's reference code derives the SwiGLU width from it)."""
        if config.head_dim * config.num_heads != config.embed_dim:
            raise QattuneError("the Meta format cannot express head_dim != embed_dim / num_heads; save as HF")
        params: dict[str, Any] = {
            "dim": config.embed_dim,
            "n_layers": config.num_layers,
            "n_heads": config.num_heads,
            "n_kv_heads": config.num_kv_heads,
            "vocab_size": config.vocab_size,
            **_meta_ffn_params(config.embed_dim, config.intermediate_dim),
            "norm_eps": config.norm_eps,
            "rope_theta": config.rope_base,
            "use_scaled_rope": config.rope_scaling_factor is not None,
        }
        if params["ffn_dim_multiplier"] is None:
            del params["ffn_dim_multiplier"]
        if config.rope_scaling_factor is not None:
            default = RopeConfig(config.head_dim, scaling_factor=config.rope_scaling_factor)
            if (config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_seq_len) != (
                default.low_freq_factor, default.high_freq_factor, default.original_max_seq_len
            ):
                raise QattuneError("the Meta format only holds RoPE scaling with low/high 1/4 and 8192; save as HF")
            # Explicit even when it is the family's default: params.json alone cannot tell 3.1 from 3.2.
            params["rope_scaling_factor"] = config.rope_scaling_factor
        return params

    # --- GGUF metadata ---------------------------------------------------------------------------------
    def config_to_gguf(self, config: TransformerConfig) -> dict[str, Any]:
        """GGUF model metadata for `config` (ints are written as uint32, floats as float32).

        Llama 3.1-style RoPE scaling is not metadata in GGUF but a `rope_freqs.weight` tensor: see
        `gguf_rope_freqs`. Tokenizer metadata is the tokenizer's business.
        """
        arch = self.gguf_architecture
        return {
            "general.architecture": arch,
            f"{arch}.block_count": config.num_layers,
            f"{arch}.context_length": config.max_seq_len,
            f"{arch}.embedding_length": config.embed_dim,
            f"{arch}.feed_forward_length": config.intermediate_dim,
            f"{arch}.attention.head_count": config.num_heads,
            f"{arch}.attention.head_count_kv": config.num_kv_heads,
            f"{arch}.attention.key_length": config.head_dim,
            f"{arch}.attention.value_length": config.head_dim,
            f"{arch}.rope.dimension_count": config.head_dim,
            f"{arch}.rope.freq_base": float(config.rope_base),
            f"{arch}.attention.layer_norm_rms_epsilon": float(config.norm_eps),
            f"{arch}.vocab_size": config.vocab_size,
        }

    def gguf_rope_freqs(self, config: TransformerConfig) -> Optional[torch.Tensor]:
        """llama.cpp's `rope_freqs.weight` (per-frequency divisors) for scaled RoPE, else None."""
        if config.rope_scaling_factor is None:
            return None
        plain = RopeConfig(config.head_dim, config.rope_base)
        return inverse_frequencies(plain) / inverse_frequencies(config.rope)

    def config_from_gguf(
        self,
        metadata: Mapping[str, Any],
        tensor_shapes: Mapping[str, tuple[int, ...]],
        rope_freqs: Optional[torch.Tensor],
        source: str,
    ) -> TransformerConfig:
        """qattune's config from GGUF metadata (`<arch>.*` keys) and tensor shapes (torch order)."""
        arch = self.gguf_architecture

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise QattuneError(f"{source}: GGUF metadata key '{arch}.{name}' is missing")
            return value

        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise QattuneError(f"{source}: GGUF rope scaling '{scaling_type}' is not supported")
        heads = int(key("attention.head_count"))
        embed_dim = int(key("embedding_length"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length", embed_dim // heads))
        if int(metadata.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
            raise QattuneError(f"{source}: partial rotary embeddings (rope.dimension_count < head_dim) are unsupported")
        rope_base = _f32_decimal(key("rope.freq_base", 10000.0))
        scaling = {} if rope_freqs is None else _llama3_scaling_from_factors(rope_freqs, head_dim, rope_base, source)
        return TransformerConfig(
            vocab_size=int(tensor_shapes["token_embd.weight"][0]),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            embed_dim=embed_dim,
            intermediate_dim=int(key("feed_forward_length")),
            max_seq_len=int(key("context_length")),
            head_dim=head_dim,
            norm_eps=_f32_decimal(key("attention.layer_norm_rms_epsilon")),
            rope_base=rope_base,
            tie_embeddings="output.weight" not in tensor_shapes,
            qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
            **scaling,
        )


def _f32_decimal(value: Any) -> float:
    """GGUF stores floats as float32; recover the decimal the writer meant (1e-05, not 9.99999974e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _llama3_scaling_from_factors(
    rope_freqs: torch.Tensor, head_dim: int, base: float, source: str
) -> dict[str, Any]:
    """Llama 3.1 scaling parameters that reproduce llama.cpp's `rope_freqs` (per-frequency divisors)."""
    factors = rope_freqs.float().flatten()
    plain = inverse_frequencies(RopeConfig(head_dim, base))
    factor = float(factors.max())
    for original in (8192, 4096, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            cfg = RopeConfig(head_dim, base, factor, low, high, original)
            if torch.allclose(plain / inverse_frequencies(cfg), factors, rtol=1e-4, atol=1e-4):
                return {
                    "rope_scaling_factor": factor,
                    "rope_low_freq_factor": low,
                    "rope_high_freq_factor": high,
                    "rope_original_max_seq_len": original,
                }
    raise QattuneError(f"{source}: its rope_freqs tensor is not a Llama 3.1-style RoPE scaling qattune can express")


class Llama2Adapter(StateDictAdapter):
    """Llama 2: 4k context, no RoPE scaling."""

    meta_max_seq_len = 4096


class Llama3_2Adapter(StateDictAdapter):
    """Llama 3.2 1B/3B: Meta's params.json says use_scaled_rope, and means factor 32."""

    meta_rope_scaling_factor = 32.0


class Qwen2Adapter(StateDictAdapter):
    """Qwen2 / Qwen2.5: q/k/v biases; llama.cpp stores it with NeoX (half-split) rotation."""

    family = "qwen2"
    hf_model_type = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    gguf_architecture = "qwen2"
    gguf_interleaved_rotary = False
    hf_defaults = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}

    def _check_hf_supported(self, hf: Mapping[str, Any], source: str) -> None:
        if hf.get("hidden_act", "silu") != "silu":
            raise QattuneError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
        if hf.get("use_sliding_window"):
            raise QattuneError(f"{source}: sliding-window attention (use_sliding_window) is not supported")

    def _hf_qkv_bias(self, hf: Mapping[str, Any]) -> bool:
        return True

    def _hf_extra_config(self, config: TransformerConfig) -> dict[str, Any]:
        if not config.qkv_bias:
            raise QattuneError("a Qwen2 config.json implies q/k/v biases but this model has none; use model_type llama")
        return {"use_sliding_window": False}


# The one registry: model_type (HF config.json's, GGUF's architecture, or torchtune's name) -> adapter.
MODEL_TYPES: dict[str, type[StateDictAdapter]] = {
    "llama": StateDictAdapter,
    "llama2": Llama2Adapter,
    "llama3": StateDictAdapter,
    "llama3_1": StateDictAdapter,
    "llama3_2": Llama3_2Adapter,
    "smollm2": StateDictAdapter,
    "qwen2": Qwen2Adapter,
    "qwen2_5": Qwen2Adapter,
}


def get_adapter(model_type: str) -> StateDictAdapter:
    """The adapter for `model_type` (case and '-'/'.' spelling ignored: "LLAMA3_2", "qwen2.5")."""
    key = model_type.strip().lower().replace("-", "_").replace(".", "_")
    if key not in MODEL_TYPES:
        raise QattuneError(f"unknown model_type '{model_type}'; known model types: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[key]()


__all__ = [
    "FORMATS",
    "MODEL_TYPES",
    "Llama2Adapter",
    "Llama3_2Adapter",
    "Qwen2Adapter",
    "StateDictAdapter",
    "get_adapter",
    "half_split_to_interleaved",
    "interleaved_to_half_split",
    "meta_intermediate_dim",
]
