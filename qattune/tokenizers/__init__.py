"""qattune.tokenizers: Llama 3 (tiktoken), Llama 2 (SentencePiece), byte-level BPE from GGUF and Qwen2.5
files (tiktoken), with one interface (`Tokenizer`) and the chat formats of each family."""

from .base import Segment, Tokenizer
from .bytes import ByteTokenizer, byte_tokenizer
from .chat_format import ChatFormat, ChatMLFormat, Llama2ChatFormat, Llama3ChatFormat
from .gguf_bpe import gguf_tokenizer
from .hf_export import write_hf_tokenizer_files
from .llama2 import SentencePieceTokenizer, llama2_tokenizer
from .llama3 import LLAMA3_SPECIAL_TOKENS, llama3_tokenizer
from .qwen2_5 import QWEN2_5_DEFAULT_SYSTEM_PROMPT, qwen2_5_tokenizer
from .tiktoken_base import TiktokenTokenizer

__all__ = [
    "ByteTokenizer",
    "ChatFormat",
    "ChatMLFormat",
    "LLAMA3_SPECIAL_TOKENS",
    "Llama2ChatFormat",
    "Llama3ChatFormat",
    "QWEN2_5_DEFAULT_SYSTEM_PROMPT",
    "Segment",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "byte_tokenizer",
    "gguf_tokenizer",
    "llama2_tokenizer",
    "llama3_tokenizer",
    "qwen2_5_tokenizer",
    "write_hf_tokenizer_files",
]
