"""KV-cache decoding of a batch of token prompts with any model that has the Transformer interface.

Batching design (right padding, per-row positions): prompts of lengths L_i are padded on the right to
L = max L_i and prefilled in one forward with positions 0..L-1 in every row. Each row reads its first
logits at index L_i - 1, so every real token sits at exactly the position (and cache slot) it would have
alone. Decoding step s then feeds row i at position L_i + s - 1, one position per row: the new key/value
overwrites the padding's cache slot, and the model's default causal-by-position mask (`slot <= position`)
hides any padding slot that is still ahead. No padding token is ever attended to by a real token, RoPE
positions are those of the unbatched prompt, and no extra mask is needed.

The model must provide `setup_caches(batch_size, max_seq_len, dtype=, device=)`, `caches_are_enabled()`
and `forward(tokens, *, input_pos)`; float, fake-quantized and converted (quantized) models all do.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.generation.sampling import check_sampling_options, sample_next_token

StopCondition = Callable[[int, list[int]], bool]
"""Called as `condition(row, generated_ids)` after each new token of an unfinished row; True ends the row."""


@dataclass(frozen=True)
class GenerationStats:
    """Counts and timings of one `generate` call (seconds; token counts exclude padding)."""

    batch_size: int
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_time_s: float

    @property
    def total_time_s(self) -> float:
        return self.time_to_first_token_s + self.decode_time_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced after each row's first one, per second of decoding (0.0 if none)."""
        after_first = self.generated_tokens - self.batch_size
        return after_first / self.decode_time_s if after_first > 0 and self.decode_time_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """All generated tokens per second, prefill included."""
        return self.generated_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_time_s": self.total_time_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class GenerationOutput:
    """Generated ids per prompt (stop token not included), why each row ended, and the stats.

    `finish_reasons[i]` is "stop_token", "stop_condition" or "length" (max_new_tokens reached).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats


def model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype of the model's first floating-point tensor (its compute dtype) and its device."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    raise QattuneError(f"{type(model).__name__} has no floating-point parameter or buffer to take a dtype from")


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, model: nn.Module) -> list[list[int]]:
    if max_new_tokens < 0:
        raise QattuneError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompts:
        raise QattuneError("generate got no prompts; give at least one")
    rows = [list(map(int, p)) for p in prompts]
    for index, row in enumerate(rows):
        if not row:
            raise QattuneError(f"prompt {index} is empty; every prompt needs at least one token (e.g. bos)")
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    needed = max(map(len, rows)) + max_new_tokens
    if limit is not None and needed > limit:
        raise QattuneError(f"the longest prompt ({needed - max_new_tokens} tokens) plus max_new_tokens="
                           f"{max_new_tokens} is {needed}, beyond the model's max_seq_len {limit}; "
                           "shorten the prompt or lower max_new_tokens")
    return rows


COMPILED_CACHE_MULTIPLE = 256


def _round_up_cache(length: int, model: nn.Module) -> int:
    """`length` rounded up to a multiple of COMPILED_CACHE_MULTIPLE, within the model's max_seq_len."""
    rounded = -(-length // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    return rounded if limit is None else max(length, min(rounded, limit))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CudaGraphStep:
    """A one-token decode step recorded once as a CUDA graph and replayed for every later token.

    Eager decoding of a small batch is bound by kernel launches, not by the GPU; a replay launches the
    whole step at once. The first call runs the step for real on a side stream (it also warms up kernel
    selection and lazily built caches such as packed int4 weights), then records it; later calls copy
    their inputs into the recorded buffers and replay. The KV caches are the model's own buffers and keep
    their addresses for the whole `generate` call, so the recorded cache writes land where they should.
    The returned logits are the graph's output buffer: read them before the next call.
    """

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.step = step
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def __call__(self, ids: torch.Tensor, *, input_pos: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.ids.copy_(ids)
            self.input_pos.copy_(input_pos)
            self.graph.replay()
            return self.logits
        self.ids, self.input_pos = ids.clone(), input_pos.clone()
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            logits = self.step(self.ids, input_pos=self.input_pos)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only: the step above already wrote this position
            self.logits = self.step(self.ids, input_pos=self.input_pos)
        return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int = 0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    stop_condition: Optional[StopCondition] = None,
    compile: bool = False,
    cuda_graph: bool = False,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` after each prompt (a list of token ids) with a KV cache.

    temperature 0 is greedy; otherwise tokens are sampled (see `qattune.generation.sampling`) with
    `generator`, or a fresh one seeded with `seed`. A row ends at its first token in `stop_tokens`
    (left out of the output), when `stop_condition(row, ids)` is true, or at `max_new_tokens`.
    Caches are set up for this call (replacing any the model had) and removed afterwards.
    compile: run the one-token decode step through `torch.compile` (static shapes; the cache length is
    rounded up to a multiple of COMPILED_CACHE_MULTIPLE so calls with similar lengths reuse one graph).
    The prefill stays eager. The first call pays the compilation.
    cuda_graph: (CUDA) replay the decode step from a CUDA graph (`CudaGraphStep`), alone or after
    `compile`: same tokens, without the per-kernel launch cost that bounds small-batch decoding.
    """
    check_sampling_options(temperature, top_k, top_p)
    rows = _check_prompts(prompts, max_new_tokens, model)
    batch, stops = len(rows), set(int(t) for t in stop_tokens)
    lengths = [len(r) for r in rows]
    if max_new_tokens == 0:
        empty = GenerationStats(batch, sum(lengths), 0, 0.0, 0.0)
        return GenerationOutput([[] for _ in rows], ["length"] * batch, empty)
    dtype, device = model_dtype_and_device(model)
    if cuda_graph and device.type != "cuda":
        raise QattuneError(f"cuda_graph=True needs a model on a CUDA device; this one is on {device.type} "
                           "(set device=cuda, or cuda_graph=false)")
    if generator is None and seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    prompt_len = max(lengths)
    padded = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row)
    padded = padded.to(device)
    lengths_t = torch.tensor(lengths, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    cache_len = prompt_len + max_new_tokens
    decode_step: Callable[..., torch.Tensor] = model
    if compile:
        cache_len = _round_up_cache(cache_len, model)
        decode_step = torch.compile(model, dynamic=False)
    if cuda_graph:
        decode_step = CudaGraphStep(decode_step)
    had_caches = model.caches_are_enabled()
    model.setup_caches(batch, cache_len, dtype=dtype, device=device)
    try:
        _sync(device)
        start = time.perf_counter()
        logits = model(padded, input_pos=torch.arange(prompt_len, device=device))
        next_ids = pick(logits[torch.arange(batch, device=device), lengths_t - 1])
        _sync(device)
        first_token_at = time.perf_counter()

        generated: list[list[int]] = [[] for _ in rows]
        reasons: list[Optional[str]] = [None] * batch
        produced = 0
        for step in range(max_new_tokens):
            if step > 0:
                position = (lengths_t + step - 1).unsqueeze(1)
                logits = decode_step(next_ids.unsqueeze(1), input_pos=position)
                next_ids = pick(logits[:, -1])
            for index, token in enumerate(next_ids.tolist()):
                if reasons[index] is not None:
                    continue
                produced += 1
                if token in stops:
                    reasons[index] = "stop_token"
                    continue
                generated[index].append(token)
                if stop_condition is not None and stop_condition(index, generated[index]):
                    reasons[index] = "stop_condition"
                elif len(generated[index]) == max_new_tokens:
                    reasons[index] = "length"
            if all(r is not None for r in reasons):
                break
        _sync(device)
        end = time.perf_counter()
    finally:
        if had_caches:
            model.reset_caches()
        elif hasattr(model, "remove_caches"):
            model.remove_caches()
    stats = GenerationStats(batch, sum(lengths), produced, first_token_at - start, end - first_token_at)
    return GenerationOutput(generated, [r or "length" for r in reasons], stats)
