"""Generate text with KV-cache decoding from a float or quantized checkpoint.

    qattune run generate --config generation checkpoint_dir=out/quantized prompt="What is a generator?"

`checkpoint_dir` is a Hugging Face folder, a training `step_N`, a `quantize` output, or a .gguf file.
Several `prompts` decode together in one batch; with `chat: true` each prompt is a user message sent
through the tokenizer's chat format. Greedy by default; `temperature`, `top_k`, `top_p` sample.
"""

from typing import Literal, Optional

from qattune.config import Component, RecipeConfig, recipe_main


class Config(RecipeConfig):
    checkpoint_dir: str
    tokenizer: Component
    prompt: Optional[str] = None
    prompts: Optional[list[str]] = None
    chat: bool = True
    system_prompt: Optional[str] = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    device: Optional[str] = None  # default cpu
    dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "fp32"
    keep_dequantized: bool = True  # quantized layers without a kernel keep their dequantized weight (speed)
    compile: bool = False  # torch.compile the decode step
    cuda_graph: bool = False  # CUDA: replay the decode step from a CUDA graph (small batches decode faster)


def recipe(cfg) -> None:
    from qattune.checkpoint import load_model
    from qattune.config import instantiate
    from qattune.errors import QattuneError
    from qattune.generation import generate_text
    import torch

    from qattune.training.precision import resolve_dtype

    texts = ([cfg.prompt] if cfg.prompt else []) + list(cfg.prompts or [])
    if not texts:
        raise QattuneError("nothing to generate from: set prompt=\"...\" or prompts=[...]")
    tokenizer = instantiate(cfg.tokenizer)
    model = load_model(cfg.checkpoint_dir, device=cfg.device or "cpu", dtype=resolve_dtype(cfg.dtype, torch.device(cfg.device or "cpu")),
                       keep_dequantized=cfg.keep_dequantized)
    if cfg.chat:
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        prompts = [system + [{"role": "user", "content": text}] for text in texts]
    else:
        prompts = texts
    result = generate_text(model, tokenizer, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, compile=cfg.compile,
                           cuda_graph=cfg.cuda_graph)
    for text, answer in zip(texts, result.texts):
        print(f"> {text}\n{answer}\n")
    stats = result.output.stats
    print(f"{stats.generated_tokens} tokens in {stats.total_time_s:.2f} s ({stats.tokens_per_s:.1f} tokens/s; "
          f"decoding {stats.decode_tokens_per_s:.1f} tokens/s, first token after {stats.time_to_first_token_s:.2f} s)")


if __name__ == "__main__":
    recipe_main(recipe, __file__)
