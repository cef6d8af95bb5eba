"""Hugging Face tokenizer files for the byte-level BPE tokenizer stored in a GGUF file.

A model imported from GGUF and saved as a Hugging Face checkpoint needs tokenizer files beside its
weights for `transformers` to load it. `write_hf_tokenizer_files` writes them from the GGUF metadata:
tokenizer.json (the same vocabulary, merges and pre-tokenizer `gguf_tokenizer` uses) and
tokenizer_config.json (bos/eos/pad tokens and the chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .byte_level import GGUF_PRETOKENIZERS, GPT2_DIGITS_PATTERN, GPT2_PATTERN
from .gguf_bpe import NORMAL, USER_DEFINED, gguf_tokenizer, read_tokenizer_metadata


def _pre_tokenizer(pattern: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pattern == GPT2_PATTERN:
        return byte_level
    if pattern == GPT2_DIGITS_PATTERN:
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}


def _post_processor(bos: str | None, bos_id: int | None) -> dict[str, Any]:
    if bos is None:
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, first, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def write_hf_tokenizer_files(gguf_path: str, out_dir: str) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for the GGUF's tokenizer into `out_dir`; return their paths.

    Raises QattuneError for a GGUF whose tokenizer `gguf_tokenizer` cannot read (checked by building it).
    """
    tokenizer = gguf_tokenizer(gguf_path)  # validates the metadata with one-line errors
    meta = read_tokenizer_metadata(gguf_path)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    bos = tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else None
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind != USER_DEFINED} for i, (t, kind) in enumerate(zip(tokens, types)) if kind != NORMAL]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(GGUF_PRETOKENIZERS[meta["tokenizer.ggml.pre"]]),
        "post_processor": _post_processor(bos, tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(meta["tokenizer.ggml.merges"])},
    }
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[tokenizer.eos_id],
        "pad_token": tokens[tokenizer.pad_id],
        "unk_token": None,
        "add_bos_token": tokenizer.bos_id is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config)):
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
        written.append(str(out / name))
    return written
