"""Qwen2.5 tokenizer: byte-level BPE from `tokenizer.json` (or vocab.json + merges.txt) on tiktoken.

Pre-tokenization uses the regex in the file's pre-tokenizer when it has one (Qwen's own), else Qwen2's.
Special tokens come from the file's `added_tokens` (tokenizer.json) or `added_tokens_decoder` in a
tokenizer_config.json beside vocab.json; without either, Qwen2.5's 22 standard ones follow the
vocabulary (<|endoftext|> = len(vocab), as in the released files: 151643). Added tokens that are not
special (<tool_call>, <|fim_prefix|>, ...) are cut out of any text and kept when decoding, as in
Hugging Face. eos is tokenizer_config.json's eos_token when present, else <|endoftext|>; bos is None.
Text is NFC-normalized first, as Qwen's tokenizer.json says (its `normalizer`; read from the file) and
as Hugging Face's slow Qwen2Tokenizer always does for vocab.json + merges.txt.
Chat: ChatML with Qwen's default system prompt when the conversation has none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qattune.errors import QattuneError

from .byte_level import QWEN2_PATTERN
from .chat_format import ChatMLFormat
from .files import require_file
from .hf_bpe import BytePairFiles, read_json, read_tokenizer_json
from .tiktoken_base import TiktokenTokenizer

QWEN2_5_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's added tokens in id order, with Hugging Face's `special` flag.
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                          "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")),
    *((t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")),
)


def _from_vocab_and_merges(vocab_file: Path, merges_file: Path) -> BytePairFiles:
    vocab = read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise QattuneError(f"{vocab_file} is not a vocab.json (a JSON object of token -> id)")
    lines = require_file(str(merges_file), "merges file").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    config = vocab_file.parent / "tokenizer_config.json"
    if config.is_file() and "added_tokens_decoder" in (decoder := read_json(config)):
        added = [(t["content"], int(i), bool(t.get("special", True))) for i, t in decoder["added_tokens_decoder"].items()]
    else:
        added = [(t, len(vocab) + i, special) for i, (t, special) in enumerate(QWEN2_5_ADDED_TOKENS)]
    return BytePairFiles(vocab, merges, added, QWEN2_PATTERN, "NFC")


def qwen2_5_tokenizer(path: str, merges_file: Optional[str] = None, max_seq_len: Optional[int] = None,
                      default_system_prompt: Optional[str] = QWEN2_5_DEFAULT_SYSTEM_PROMPT) -> TiktokenTokenizer:
    """The Qwen2.5 tokenizer from `tokenizer.json`, or from `vocab.json` with `merges_file` (merges.txt).

    `path` may also be a directory holding tokenizer.json (or vocab.json and merges.txt).
    `default_system_prompt`: the system message put first when a conversation has none (None: none).
    """
    file = Path(path).expanduser()
    if file.is_dir():
        if (file / "tokenizer.json").is_file() and merges_file is None:
            file = file / "tokenizer.json"
        else:
            merges_file = merges_file or str(file / "merges.txt")
            file = file / "vocab.json"
    require_file(str(file), "Qwen tokenizer file")
    if merges_file is None:
        files = read_tokenizer_json(file, "qwen2_5_tokenizer")
    else:
        files = _from_vocab_and_merges(file, Path(merges_file).expanduser())
    ranks, special = files.ranks_and_specials(str(file))
    for required in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        if required not in special:
            raise QattuneError(f"{file} lacks Qwen's special token {required}; is this a Qwen2.5 tokenizer?")
    eos = "<|endoftext|>"
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        eos_token = read_json(config).get("eos_token")
        eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
        if eos_token in special:
            eos = eos_token
    return TiktokenTokenizer(
        name=f"qwen2.5:{file.name}",
        pattern=files.pattern or QWEN2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special,
        added_tokens=files.not_special(),
        bos_id=None,
        eos_id=special[eos],
        pad_id=special["<|endoftext|>"],
        stop_tokens=[special["<|im_end|>"], special["<|endoftext|>"]],
        chat_format=ChatMLFormat(default_system_prompt),
        max_seq_len=max_seq_len,
        normalization=files.normalization,
    )
