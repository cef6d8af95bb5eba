"""`QattuneLM`: lm-evaluation-harness's `LM` interface over a qattune model and tokenizer.

Importing this module imports `lm_eval`; the rest of qattune reaches it through `lm_eval_model()`
(qattune.eval.lm_eval_tasks), so qattune works without lm-eval installed.

Conventions (those of lm-eval's Hugging Face model, `HFLM`):
- text is encoded without eos; special-token strings in the text are parsed as special tokens (as
  Hugging Face tokenizers do), so chat-templated prompts encode to the chat format's ids;
- `loglikelihood(context, continuation)`: trailing whitespace of the context moves to the continuation,
  `whole = encode(context + continuation)`, `context_ids = encode(context)` and the continuation ids
  are `whole[len(context_ids):]`; with `add_bos` (default) the tokenizer's bos is put before the context,
  and an empty context is the prefix token alone (bos, or eos without one). Inputs longer than
  `max_length` keep their last `max_length` tokens;
- `loglikelihood_rolling(text)`: lm-eval's own rolling windows (`get_rolling_token_windows` with context
  length 1 and `make_disjoint_window`) after the prefix token: every token is predicted exactly once;
- `generate_until(context, gen_kwargs)`: KV-cache decoding (`qattune.generation.generate`), greedy unless
  sampling (`do_sample`, or when it is unset a temperature > 0, as lm-eval's `normalize_gen_kwargs`);
  stops at the tokenizer's stop tokens, at `max_gen_toks` (or its aliases `max_new_tokens`,
  `max_tokens`, `max_completion_tokens`), or at the first `until` string, which is cut from the returned
  text. Prompts keep their last `max_length - max_gen_toks` tokens (a warning says when one is cut); a
  generation kwarg qattune cannot honour, or `max_gen_toks >= max_length`, is one error line.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple, Optional, Sequence

from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from torch import nn
from tqdm import tqdm

from qattune.errors import QattuneError
from qattune.eval.perplexity import DEFAULT_MAX_SEQ_LEN, default_prefix_token
from qattune.eval.scoring import score_windows
from qattune.generation.decode import generate, model_dtype_and_device


log = logging.getLogger(__name__)
# lm-eval's names for the generation limit, in its priority order
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
HONOURED = ("until", *MAX_TOKEN_KEYS, "do_sample", "temperature", "top_k", "top_p")


class GenerationSettings(NamedTuple):
    until: list[str]
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_k: Optional[int]
    top_p: Optional[float]


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int, max_length: int) -> GenerationSettings:
    """A task's `generation_kwargs` as lm-eval's `normalize_gen_kwargs` reads them (limit aliases;
    sampling when `do_sample` is unset and the temperature > 0), refusing what qattune cannot honour."""
    kwargs = dict(gen_kwargs)
    if kwargs.get("num_beams", 1) == 1:
        kwargs.pop("num_beams", None)  # one beam is plain decoding
    unknown = sorted(key for key in kwargs if key not in HONOURED)
    if unknown:
        raise QattuneError(f"a task's generation_kwargs {unknown} cannot be honoured by qattune's generate_until, "
                           f"which reads {', '.join(HONOURED)}")
    until = kwargs.get("until") or []
    limits = [kwargs[key] for key in MAX_TOKEN_KEYS if kwargs.get(key) is not None]
    max_new = int(limits[0]) if limits else default_max_new_tokens
    if max_new >= max_length:
        raise QattuneError(f"a task generates up to {max_new} tokens (max_gen_toks), which leaves no room for its "
                           f"prompt in max_seq_length={max_length}: raise max_seq_length, or lower the task's "
                           "max_gen_toks")
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = kwargs.get("do_sample")
    sampling = temperature > 0 if do_sample is None else bool(do_sample)
    top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
    return GenerationSettings([until] if isinstance(until, str) else list(until), max_new,
                              temperature if sampling else 0.0, None if top_k is None else int(top_k),
                              None if top_p is None else float(top_p))


class QattuneLM(LM):
    """Evaluate a qattune model (float, fake-quantized or converted) with lm-eval.

    Args:
        model: a `Transformer` (or any module with its interface), in eval mode.
        tokenizer: a qattune tokenizer.
        batch_size: windows or prompts per forward pass.
        max_length: longest model input; default the model's `config.max_seq_len`, at most
            `DEFAULT_MAX_SEQ_LEN` (2048).
        max_gen_toks: default limit of generated tokens for `generate_until`.
        add_bos: put the tokenizer's bos (if any) before every context.
        prefix_token_id: token to condition empty contexts and rolling windows on; default bos, else eos.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        add_bos: bool = True,
        prefix_token_id: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or min(model.config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        self.max_gen_toks = max_gen_toks
        self.add_bos = add_bos
        self.prefix_token_id = default_prefix_token(tokenizer) if prefix_token_id is None else prefix_token_id
        self._device = model_dtype_and_device(model)[1]
        self._warned_truncation = False

    # -- text <-> ids ------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False, add_eos=False, allowed_special="all")

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_id
        return [bos] if self.add_bos and bos is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (with bos) and continuation ids of one loglikelihood request (see module docs)."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return self._bos() + context_ids, whole[len(context_ids):]

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last `max_length` model inputs (context first, then the continuation's start)."""
        sequence = context + continuation
        keep = min(len(sequence), self.max_length + 1)
        sequence = sequence[-keep:]
        split = max(1, len(sequence) - len(continuation))
        return sequence[:split], sequence[split:]

    # -- lm-eval requests --------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = [self._truncate(*self.encode_pair(*r.args)) for r in requests]
        scores = score_windows(self.model, windows, self.batch_size)
        results = [(s.logprob, s.is_greedy) for s in scores]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, score_windows(self.model, windows, self.batch_size)):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate_batch([requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
                for index, text in zip(chunk, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(chunk))
        progress.close()
        return results  # type: ignore[return-value]

    def _generate_batch(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        settings = generation_settings(gen_kwargs, self.max_gen_toks, self.max_length)
        until = settings.until
        keep = self.max_length - settings.max_new_tokens
        prompts = [self._bos() + self.tok_encode(c) for c in contexts]
        if max(map(len, prompts)) > keep and not self._warned_truncation:
            log.warning("generate_until: prompts longer than %d tokens (max_seq_length %d - max_gen_toks %d) keep "
                        "their last %d tokens", keep, self.max_length, settings.max_new_tokens, keep)
            self._warned_truncation = True
        decode = self.tokenizer.decode

        def hit_until(row: int, ids: list[int]) -> bool:
            return bool(until) and any(stop in decode(ids) for stop in until)

        output = generate(self.model, [ids[-keep:] for ids in prompts], settings.max_new_tokens,
                          temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          stop_tokens=self.tokenizer.stop_tokens, pad_id=self.tokenizer.pad_id,
                          stop_condition=hit_until)
        return [_cut_at_first(decode(ids), until) for ids in output.tokens]

    # -- chat templates ----------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def chat_template(self, chat_template: Any = False) -> str:
        """A name for the chat format (lm-eval records it); the format itself lives in the tokenizer."""
        return type(getattr(self.tokenizer, "chat_format", None)).__name__

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)


def _cut_at_first(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]
