"""Built-in perplexity and bits per byte of a model on plain text, exactly defined.

Each document is encoded without bos/eos to `t_1..t_n` and preceded by one prefix token `t_0` (the
tokenizer's bos, or its eos when it has no bos), so every real token is predicted exactly once. Special-
token strings in the text (`<|im_start|>` of a chat-formatted document) are read as those tokens, as
Hugging Face tokenizers and the lm-eval adapter read them.
- windows of at most `max_seq_len` input tokens start at positions 0, stride, 2·stride, ... of `t_0..t_n`;
  the window starting at `b` reads `t_b..t_{e-1}` (e = min(b + max_seq_len, n)) and scores only the targets
  not scored before (those after the previous window's last target), up to `t_e`;
- `stride == max_seq_len` gives disjoint chunks; a smaller stride gives every scored token at least
  `max_seq_len - stride` tokens of context (the sliding-window evaluation of fixed-length models).
Documents are independent (no context crosses a document boundary). Over all documents:
`nll = -Σ log p(t_i | context)` (nats), `perplexity = exp(nll / tokens)`,
`bits_per_byte = nll / (ln 2 · utf-8 bytes of the documents)`, `byte_perplexity = 2 ** bits_per_byte`.
Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.
The same totals are kept per document (`PerplexityResult.per_document`), to show which texts a model
handles worse than another.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from qattune.errors import QattuneError
from qattune.eval.scoring import score_windows

DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class DocumentScore:
    """One scored document: its position in the texts given (from 0), its tokens, UTF-8 bytes and nll."""

    index: int
    tokens: int
    bytes: int
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


@dataclass(frozen=True)
class PerplexityResult:
    """Totals over the evaluated documents, the metrics derived from them (see module docs), and each
    document's own totals."""

    documents: int
    tokens: int
    bytes: int
    nll: float
    max_seq_len: int
    stride: int
    per_document: tuple[DocumentScore, ...] = ()

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    @property
    def byte_perplexity(self) -> float:
        return 2.0 ** self.bits_per_byte

    def metrics(self) -> dict[str, float]:
        """The lower-is-better metrics, by name, for reports and comparisons."""
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "nll_per_token": self.nll_per_token, "byte_perplexity": self.byte_perplexity}

    def per_document_metrics(self) -> dict[str, float]:
        """Each document's perplexity, named `document_<n>/perplexity` (n: its position, from 1)."""
        return {f"document_{d.index + 1}/perplexity": d.perplexity for d in self.per_document}

    def to_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
                "max_seq_len": self.max_seq_len, "stride": self.stride, **self.metrics(),
                "per_document": [{"index": d.index, "tokens": d.tokens, "bytes": d.bytes, "nll": d.nll,
                                  "perplexity": d.perplexity} for d in self.per_document]}


def perplexity_windows(tokens: Sequence[int], prefix_token: int, max_seq_len: int,
                       stride: Optional[int] = None) -> list[tuple[list[int], list[int]]]:
    """The `(context, continuation)` scoring windows of one document (see module docs)."""
    stride = max_seq_len if stride is None else stride
    if max_seq_len < 1 or not 1 <= stride <= max_seq_len:
        raise QattuneError(f"perplexity needs max_seq_len >= 1 and 1 <= stride <= max_seq_len; "
                           f"got max_seq_len={max_seq_len}, stride={stride}")
    sequence = [prefix_token, *tokens]
    last = len(sequence) - 1  # index of the last target
    windows, scored_up_to = [], 0  # targets t_1..t_scored_up_to are done
    for begin in range(0, last, stride):
        end = min(begin + max_seq_len, last)
        if end > scored_up_to:
            windows.append((sequence[begin : scored_up_to + 1], sequence[scored_up_to + 1 : end + 1]))
            scored_up_to = end
        if end == last:
            break
    return windows


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resolve_windows(max_seq_len: Optional[int], stride: Optional[int], model_limit: Optional[int]) -> tuple[int, int]:
    """The window length and stride `perplexity` uses on a model whose max_seq_len is `model_limit`:
    max_seq_len defaults to the model's, at most DEFAULT_MAX_SEQ_LEN, stride to max_seq_len. A
    QattuneError for a value that is not a whole number in range (checked before any model loads)."""
    for key, value in (("max_seq_len", max_seq_len), ("stride", stride)):
        if value is not None and not _positive_int(value):
            raise QattuneError(f"perplexity.{key}={value} must be a whole number >= 1 (or null: the default)")
    if max_seq_len is None:
        max_seq_len = min(model_limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    elif model_limit is not None and max_seq_len > model_limit:
        raise QattuneError(f"perplexity windows of max_seq_len={max_seq_len} tokens are longer than the model's "
                           f"max_seq_len={model_limit}: set perplexity.max_seq_len to at most {model_limit} "
                           "(null: the model's own)")
    stride = max_seq_len if stride is None else stride
    if stride > max_seq_len:
        raise QattuneError(f"perplexity needs 1 <= stride <= max_seq_len; got max_seq_len={max_seq_len}, "
                           f"stride={stride}")
    return max_seq_len, stride


def default_prefix_token(tokenizer: Any) -> int:
    """The token every document is conditioned on first: bos, or eos when the tokenizer has no bos."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    prefix_token_id: Optional[int] = None,
    max_batch_tokens: int = 4096,
) -> PerplexityResult:
    """Perplexity and bits per byte of `model` on `texts` (empty texts are skipped).

    max_seq_len: window length; default the model's `config.max_seq_len`, at most DEFAULT_MAX_SEQ_LEN
    (attention and logits memory grow with it). stride: default max_seq_len (disjoint chunks).
    batch_size, max_batch_tokens: at most this many windows and padded tokens per forward pass.
    """
    model_limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_seq_len is None and model_limit is None:
        raise QattuneError(f"{type(model).__name__} has no config.max_seq_len; pass max_seq_len to perplexity")
    max_seq_len, stride = resolve_windows(max_seq_len, stride, model_limit)
    prefix = default_prefix_token(tokenizer) if prefix_token_id is None else prefix_token_id
    windows, spans = [], []  # spans: (document index, tokens, bytes, how many windows)
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text, add_bos=False, add_eos=False, allowed_special="all")
        if not ids:
            continue
        document_windows = perplexity_windows(ids, prefix, max_seq_len, stride)
        windows += document_windows
        spans.append((index, len(ids), len(text.encode("utf-8")), len(document_windows)))
    if not spans:
        raise QattuneError("perplexity got no text to score: every document was empty")
    scores = score_windows(model, windows, batch_size, max_batch_tokens)
    per_document, start = [], 0
    for index, tokens, size, count in spans:
        nll = -math.fsum(s.logprob for s in scores[start:start + count])
        per_document.append(DocumentScore(index, tokens, size, nll))
        start += count
    return PerplexityResult(len(spans), sum(d.tokens for d in per_document), sum(d.bytes for d in per_document),
                            -math.fsum(s.logprob for s in scores), max_seq_len, stride, tuple(per_document))


def load_texts(source: str, split: str = "validation", column: str = "text",
               max_documents: Optional[int] = None) -> list[str]:
    """Documents to evaluate on: `python_docs` (the CPython docs, train/validation split), a `.txt` file
    (one document), or a `.json` list / `.jsonl` file of objects whose `column` holds the text."""
    if max_documents is not None and not _positive_int(max_documents):
        raise QattuneError(f"perplexity.max_documents={max_documents} must be a whole number >= 1 "
                           "(or null: every document)")
    texts = _python_docs(split) if source == "python_docs" else _file_texts(source, column)
    if not texts:
        raise QattuneError(f"perplexity text source {source!r} has no documents")
    return texts if max_documents is None else texts[:max_documents]


def _python_docs(split: str) -> list[str]:
    from qattune.data.python_docs import python_docs_rows

    try:
        return [row["text"] for row in python_docs_rows(split)]  # type: ignore[arg-type]
    except QattuneError as err:
        raise QattuneError(f"perplexity.split={split}: {err}") from None


def _file_texts(source: str, column: str) -> list[str]:
    path = Path(source)
    if not path.is_file():
        raise QattuneError(f"perplexity text source {source!r} is neither 'python_docs' nor an existing file; "
                           "give a .txt, .json or .jsonl path")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix not in (".json", ".jsonl"):
        raise QattuneError(f"{path}: unsupported text file type {path.suffix!r}; use .txt, .json or .jsonl")
    raw = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
    except json.JSONDecodeError as err:
        raise QattuneError(f"{path} is not valid {path.suffix[1:].upper()}: {err}") from None
    rows = rows if isinstance(rows, list) else [rows]
    missing = next((i for i, row in enumerate(rows) if not isinstance(row, dict) or column not in row), None)
    if missing is not None:
        raise QattuneError(f"{path}: row {missing} has no {column!r} field; set the text column name")
    return [str(row[column]) for row in rows]
