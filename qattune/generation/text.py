"""Text in, text out: prompts (plain strings or chat conversations) through a tokenizer to `generate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.generation.decode import GenerationOutput, generate

Messages = Sequence[Mapping[str, Any]]
Prompt = Union[str, Messages]


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, checkpoint: str) -> None:
    """One line if `tokenizer` can produce ids the model at `checkpoint` has no embedding for (checked
    before the model loads; the model would fail on the first such id)."""
    tokenizer_size = getattr(tokenizer, "vocab_size", None)
    if tokenizer_size is not None and tokenizer_size > vocab_size:
        raise QattuneError(f"tokenizer ids reach {tokenizer_size - 1} but the model's vocab_size is {vocab_size} "
                           f"({checkpoint}): use the model's tokenizer")


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Ids of one prompt: a string is encoded with bos (if the tokenizer has one) and no eos; a list of
    `{"role", "content"}` messages goes through the chat format with the assistant generation prompt."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=True, add_eos=False)
    if isinstance(prompt, Sequence):
        ids, _ = tokenizer.tokenize_messages(prompt, add_generation_prompt=True)
        return ids
    raise QattuneError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


@dataclass(frozen=True)
class TextGeneration:
    """The decoded completions (special tokens dropped) and the raw `GenerationOutput`."""

    texts: list[str]
    output: GenerationOutput


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
    cuda_graph: bool = False,
) -> TextGeneration:
    """Generate for every prompt in one batch; `stop_tokens` defaults to the tokenizer's."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    output = generate(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=tokenizer.stop_tokens if stop_tokens is None else stop_tokens,
        pad_id=tokenizer.pad_id, seed=seed, generator=generator, compile=compile,
        cuda_graph=cuda_graph,
    )
    return TextGeneration([tokenizer.decode(t) for t in output.tokens], output)
