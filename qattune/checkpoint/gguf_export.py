"""GGUF export of a converted qattune model: its tensors under llama.cpp's names, model and tokenizer metadata.

`qattune.quant.write_gguf` writes the file and knows no model; this module is the model side:
- `gguf_tensor_sources` maps a converted `Transformer` (q4_0 / q8_0) to `{GGUF name: module or tensor}`,
  permuting q/k rows into llama.cpp's interleaved rotary layout where the architecture wants it
  (losslessly: codes and scales are per row) and adding `rope_freqs.weight` for scaled RoPE;
- `gguf_tokenizer_metadata` gives the `tokenizer.ggml.*` keys: copied from a GGUF file (the tokenizer's
  own), or built from a byte-level BPE tokenizer (tiktoken ranks -> tokens, token types, merges);
- `export_gguf` checks the scheme and writes the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.models.adapters import StateDictAdapter, half_split_to_interleaved
from qattune.models.transformer import TransformerConfig
from qattune.quant import QuantizedEmbedding, QuantizedLinear, write_gguf

GGUF_SCHEMES = ("q4_0", "q8_0")
# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

_CHATML_MESSAGES = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_LLAMA3_MESSAGES = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_LLAMA3_DATED_SYSTEM = (  # Llama 3.1 / 3.2 Instruct: a dated system message first; DATE is filled in
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: CUTOFF\\nToday Date: DATE\\n\\n' "
    "+ system + '<|eot_id|>' }}"
)


def check_gguf_scheme(scheme: str) -> None:
    """One QattuneError line when `scheme` has no GGUF block type to be stored in without requantizing."""
    if scheme not in GGUF_SCHEMES:
        raise QattuneError(
            f"gguf=true: scheme {scheme!r} cannot be stored in a GGUF file without requantizing (GGUF export holds "
            f"{' and '.join(GGUF_SCHEMES)}); set gguf=false, or quantize (and train) with scheme q4_0 or q8_0"
        )


def _same_representation(a: nn.Module, b: nn.Module) -> bool:
    """Whether two layers over one tied weight compute with the same numbers (both float, or one format)."""
    quantized = (QuantizedLinear, QuantizedEmbedding)
    if isinstance(a, quantized) != isinstance(b, quantized):
        return False
    return not isinstance(a, quantized) or a.weight_format.name == b.weight_format.name


def gguf_tensor_sources(
    model: nn.Module, config: TransformerConfig, adapter: StateDictAdapter
) -> dict[str, Union[torch.Tensor, QuantizedLinear, QuantizedEmbedding]]:
    """{GGUF tensor name: converted module or float tensor} of a converted qattune `Transformer`.

    A tied output head is left out (llama.cpp reuses the embedding) unless the head and the embedding
    were quantized differently, in which case the head is written on its own so the file computes what
    qattune computes.
    """
    modules = dict(model.named_modules())
    state = model.state_dict()
    names = adapter.names("gguf", config)
    if config.tie_embeddings and _same_representation(modules["tok_embeddings"], modules["output"]):
        names.pop("output.weight")
    rotary_heads = {"attn.q_proj": config.num_heads, "attn.k_proj": config.num_kv_heads}
    sources: dict[str, Union[torch.Tensor, QuantizedLinear, QuantizedEmbedding]] = {}
    for ours, theirs in names.items():
        owner_name, _, kind = ours.rpartition(".")
        owner = modules.get(owner_name)
        heads = next((n for proj, n in rotary_heads.items() if owner_name.endswith(proj)), None)
        permute = heads is not None and adapter.gguf_interleaved_rotary
        if isinstance(owner, (QuantizedLinear, QuantizedEmbedding)) and kind == "weight":
            source: Union[torch.Tensor, QuantizedLinear, QuantizedEmbedding] = owner
            if permute:
                order = half_split_to_interleaved(torch.arange(owner.weight_shape[0]).unsqueeze(1), heads).squeeze(1)
                source = owner.with_rows(order)
        else:
            source = state[ours]
            if permute:
                source = half_split_to_interleaved(source, heads)
        sources[theirs] = source
    rope_freqs = adapter.gguf_rope_freqs(config)
    if rope_freqs is not None:
        sources["rope_freqs.weight"] = rope_freqs.float()
    return sources


# --- tokenizer metadata ---------------------------------------------------------------------------------


def gguf_file_tokenizer_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Every `tokenizer.*` key of a GGUF file, with its GGUF value types, ready for `write_gguf`."""
    from qattune.gguf_reader import open_gguf

    try:
        fields = open_gguf(path).fields
    except Exception as err:  # gguf raises ValueError/struct.error/... on foreign files
        raise QattuneError(f"cannot read tokenizer metadata from GGUF file {path}: {err}") from None
    out = {key: (field.contents(), *field.types) for key, field in fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in out:
        raise QattuneError(f"{path} holds no tokenizer (tokenizer.ggml.model); name the model's tokenizer instead")
    return out


def _bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` split by BPE using only merges of rank below `max_rank` (two parts for a merged token)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best: Optional[tuple[int, int]] = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _merges_from_ranks(ranks: Mapping[bytes, int], spell: Any) -> list[str]:
    """The ordered merge list ("a b", GPT-2 spelling) that tiktoken's ranks imply."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise QattuneError(f"GGUF export: token {rank} ({token!r}) is not the merge of two tokens; "
                               "its vocabulary cannot be written as a byte-level BPE merge list")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return merges


def _chat_template(tokenizer: Any) -> Optional[str]:
    from qattune.tokenizers import ChatMLFormat, Llama3ChatFormat
    from qattune.tokenizers.chat_format import LLAMA3_KNOWLEDGE_CUTOFF

    chat_format = getattr(tokenizer, "chat_format", None)
    if isinstance(chat_format, ChatMLFormat):
        system = chat_format.default_system_prompt
        if system is None:
            return _CHATML_MESSAGES
        text = "<|im_start|>system\\n" + _jinja_string(system) + "<|im_end|>\\n"
        return ("{% if not messages or messages[0]['role'] != 'system' %}{{ '" + text + "' }}{% endif %}"
                + _CHATML_MESSAGES)
    if isinstance(chat_format, Llama3ChatFormat):
        if chat_format.date_string is None:
            return "{{ bos_token }}" + _LLAMA3_MESSAGES
        dated = _LLAMA3_DATED_SYSTEM.replace("CUTOFF", LLAMA3_KNOWLEDGE_CUTOFF).replace(
            "DATE", _jinja_string(chat_format.date_string))
        return "{{ bos_token }}" + dated + _LLAMA3_MESSAGES
    return None


def _jinja_string(text: str) -> str:
    """`text` escaped for a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _pre_tokenizer_name(pattern: str) -> str:
    from qattune.tokenizers.byte_level import GGUF_PRETOKENIZERS

    for name, regex in GGUF_PRETOKENIZERS.items():
        if regex == pattern:
            return name
    raise QattuneError("GGUF export: the tokenizer's pre-tokenizer regex has no llama.cpp name "
                       "(tokenizer.ggml.pre); export from a tokenizer llama.cpp knows")


def bpe_tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` keys for a byte-level BPE (tiktoken) tokenizer and a model with `vocab_size` rows.

    Ids the tokenizer does not use (a padded embedding) become `[PAD<id>]` tokens of type UNUSED, as
    llama.cpp's converter writes them.
    """
    import gguf

    from qattune.tokenizers import TiktokenTokenizer
    from qattune.tokenizers.byte_level import byte_to_char

    if not isinstance(tokenizer, TiktokenTokenizer):
        raise QattuneError(
            f"GGUF export: a {type(tokenizer).__name__} has no GGUF tokenizer form qattune can write (byte-level "
            "BPE only; the byte tokenizer has no merges); set gguf=false, or use a gguf/llama3/qwen2_5 tokenizer"
        )
    ranks: Mapping[bytes, int] = tokenizer._encoding._mergeable_ranks
    if tokenizer.vocab_size > vocab_size:
        raise QattuneError(f"GGUF export: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{vocab_size} embedding rows; the tokenizer does not belong to this model")
    table = byte_to_char()

    def spell(raw: bytes) -> str:
        return "".join(table[b] for b in raw)

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for raw, i in ranks.items():
        tokens[i], types[i] = spell(raw), _NORMAL
    added = set(tokenizer._added)
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, _USER_DEFINED if text in added else _CONTROL
    string, array, uint32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(tokenizer._pattern),
        "tokenizer.ggml.tokens": (tokens, array, string),
        "tokenizer.ggml.token_type": (types, array, gguf.GGUFValueType.INT32),
        "tokenizer.ggml.eos_token_id": (tokenizer.eos_id, uint32),
        "tokenizer.ggml.padding_token_id": (tokenizer.pad_id, uint32),
        "tokenizer.ggml.add_bos_token": tokenizer.bos_id is not None,
    }
    merges = _merges_from_ranks(ranks, spell)
    if not merges:
        raise QattuneError("GGUF export: the tokenizer has no merges, which llama.cpp's BPE requires; set gguf=false")
    meta["tokenizer.ggml.merges"] = (merges, array, string)
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = (tokenizer.bos_id, uint32)
    turn_end = next(iter(getattr(tokenizer.chat_format, "stop_tokens", ())), None)  # <|im_end|>, <|eot_id|>
    eot = tokenizer.special_tokens.get(turn_end) if turn_end is not None else None
    if eot is not None and eot != tokenizer.eos_id:
        meta["tokenizer.ggml.eot_token_id"] = (eot, uint32)
    template = _chat_template(tokenizer)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta


def gguf_tokenizer_metadata(tokenizer: Any, vocab_size: int,
                            source_gguf: Union[str, os.PathLike, None] = None) -> dict[str, Any]:
    """Tokenizer metadata for a GGUF export: copied from `source_gguf` (a GGUF file holding the model's
    tokenizer) when given, else built from `tokenizer`."""
    if source_gguf is not None:
        return gguf_file_tokenizer_metadata(source_gguf)
    if tokenizer is None:
        raise QattuneError("GGUF export needs the model's tokenizer: set `tokenizer` in the config, or gguf=false")
    return bpe_tokenizer_metadata(tokenizer, vocab_size)


def export_gguf(
    model: nn.Module,
    config: TransformerConfig,
    adapter: StateDictAdapter,
    path: Union[str, os.PathLike],
    tokenizer_metadata: Mapping[str, Any],
    float_type: str = "f16",
    name: Optional[str] = None,
) -> Path:
    """Write a converted (q4_0 / q8_0) qattune model as a GGUF file llama.cpp runs; returns the path."""
    info = getattr(model, "qattune_quantization", None)
    if info is None:
        raise QattuneError("GGUF export needs a converted model: run quantizer.convert(model) first")
    check_gguf_scheme(info["config"]["scheme"])
    metadata = dict(adapter.config_to_gguf(config))
    if name:
        metadata["general.name"] = name
    sources = gguf_tensor_sources(model, config, adapter)
    return write_gguf(path, sources, adapter.gguf_architecture, metadata, tokenizer_metadata, float_type)  # type: ignore[arg-type]
