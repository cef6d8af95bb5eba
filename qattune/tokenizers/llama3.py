"""Llama 3 tokenizer: tiktoken over Meta's `tokenizer.model` ranks file, the 256 Llama 3 special tokens;
or over the Hugging Face `tokenizer.json` of the same model (HF folders without `original/`).

The ranks file has one token per line: its bytes in base64, a space, its rank (= id). Special tokens
follow the ordinary ones: with Meta's file (128,000 ranks) <|begin_of_text|> is 128000 and <|eot_id|>
128009; with a smaller ranks file (tests) they start right after its last rank. Names follow Llama 3.1+
(128004 is <|finetune_right_pad_id|>, used as the pad id; 128008 <|eom_id|>, 128010 <|python_tag|>).
A tokenizer.json gives the same ranks (its byte-level vocabulary) and names its special tokens itself.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Optional

from qattune.errors import QattuneError

from .byte_level import LLAMA3_PATTERN
from .chat_format import Llama3ChatFormat
from .files import require_file
from .hf_bpe import read_tokenizer_json
from .tiktoken_base import TiktokenTokenizer

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{3 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS)))


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken ranks file (`<base64 token> <rank>` per line) into token bytes -> rank."""
    file = require_file(path, "tiktoken ranks file")
    data = file.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise QattuneError(f"{path} is not a tiktoken ranks file (it is binary; a SentencePiece model? "
                           "use qattune.tokenizers.llama2_tokenizer for those)") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise QattuneError(f"{path}:{line_number}: malformed ranks line {line[:60]!r}; "
                               "expected '<base64 token> <rank>'") from None
        if token in ranks or rank in seen_ranks:
            raise QattuneError(f"{path}:{line_number}: token {token!r} or rank {rank} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise QattuneError(f"{path} has no ranks; is it a tiktoken ranks file?")
    return ranks


def llama3_tokenizer(path: str, max_seq_len: Optional[int] = None,
                     date_string: Optional[str] = None) -> TiktokenTokenizer:
    """The Llama 3 / 3.1 / 3.2 tokenizer from Meta's `tokenizer.model` (a tiktoken ranks file), or from
    the `tokenizer.json` of a Hugging Face Llama 3 folder.

    bos <|begin_of_text|>, eos <|end_of_text|>, pad <|finetune_right_pad_id|> (the fifth special token);
    generation stops at <|eot_id|>, <|eom_id|> (3.1+) or <|end_of_text|>. Chat: Llama 3's header format,
    as torchtune and Meta's reference code lay it out; with `date_string` (the template's default is
    "26 Jul 2024"), as the Llama 3.1 / 3.2 Instruct Hugging Face template does, with its dated system
    message first: set it when the model will be served with that template (transformers, vLLM, llama.cpp).
    """
    file = require_file(path, "Llama 3 tokenizer file")
    pattern, added = LLAMA3_PATTERN, ()
    if _is_json(file):
        files = read_tokenizer_json(file, "llama3_tokenizer")
        ranks, special = files.ranks_and_specials(str(file))
        required = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>")
        missing = [token for token in required if token not in special]
        if missing:
            raise QattuneError(f"{file} lacks Llama 3's special token {missing[0]}; is this a Llama 3 tokenizer.json?")
        pattern, added = files.pattern or LLAMA3_PATTERN, files.not_special()
    else:
        ranks = load_tiktoken_ranks(path)
        first_special = max(ranks.values()) + 1
        special = {token: first_special + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    bos = special["<|begin_of_text|>"]
    stops = [special[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>") if t in special]
    return TiktokenTokenizer(
        name=f"llama3:{file.name}",
        pattern=pattern,
        mergeable_ranks=ranks,
        special_tokens=special,
        added_tokens=added,
        bos_id=bos,
        eos_id=special["<|end_of_text|>"],
        pad_id=special.get("<|finetune_right_pad_id|>", bos + 4),  # Llama 3.0's file calls it reserved_2
        stop_tokens=stops,
        chat_format=Llama3ChatFormat(date_string=date_string),
        max_seq_len=max_seq_len,
    )


def _is_json(file: Path) -> bool:
    with open(file, "rb") as handle:
        return handle.read(64).lstrip()[:1] == b"{"
