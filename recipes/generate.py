"""Generate text with KV-cache decoding from a float or quantized checkpoint.

    qattune run generate --config generation checkpoint_dir=out/quantized prompt="What is a generator?"
    qattune run generate --config generation checkpoint_dir=out/quantized prompts='[Hello, What is 2+2?]'

`checkpoint_dir` is a Hugging Face folder, a training `step_N`, a `quantize` output, or a .gguf file.
`prompt` is one text; `prompts`, when set, replaces it: several texts decode together in one batch. With
`chat: true` each text is a user message sent through the tokenizer's chat format. Greedy by default
(`temperature: 0`, which ignores `top_k` and `top_p`); `temperature` > 0 samples, with `top_k`, `top_p`.
`dtype` is the compute dtype, for quantized checkpoints too (their packed codes and scales stay as stored).
The device, the sampling options and the tokenizer (against the model's vocabulary) are checked before
the model loads.
"""

from typing import Literal, Optional

from qattune.config import Component, RecipeConfig, recipe_main


class Config(RecipeConfig):
    checkpoint_dir: str
    tokenizer: Component
    prompt: Optional[str] = None
    prompts: Optional[list[str]] = None  # when set, replaces prompt
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


def _texts(cfg) -> list[str]:
    """The texts to generate from: `prompts` when set (it replaces `prompt`), else `prompt`."""
    from qattune.errors import QattuneError

    key, texts = ("prompts", list(cfg.prompts)) if cfg.prompts is not None else ("prompt", [cfg.prompt])
    texts = [text for text in texts if text is not None]
    if not texts:
        raise QattuneError("nothing to generate from: set prompt=\"...\" or prompts=[...]")
    for index, text in enumerate(texts):
        if not text:
            where = f"prompts[{index}]" if key == "prompts" else "prompt"
            raise QattuneError(f"{where} is empty; give a text to generate from")
    return texts


def _check_sampling(cfg) -> None:
    import sys

    from qattune.generation.sampling import check_sampling_options

    check_sampling_options(cfg.temperature, cfg.top_k, cfg.top_p)
    ignored = [f"{key}={getattr(cfg, key)}" for key in ("top_k", "top_p") if getattr(cfg, key) is not None]
    if cfg.temperature == 0 and ignored:
        print(f"warning: {' and '.join(ignored)} ignored: temperature=0 decodes greedily; set temperature > 0 "
              "to sample", file=sys.stderr)


def recipe(cfg) -> None:
    from qattune.checkpoint import load_model
    from qattune.checkpoint import checkpoint_config
    from qattune.config import instantiate
    from qattune.errors import QattuneError
    from qattune.generation import check_tokenizer_fits, generate_text
    from qattune.training.distributed import parse_device
    from qattune.training.precision import resolve_dtype

    texts = _texts(cfg)
    _check_sampling(cfg)
    device = parse_device(cfg.device or "cpu")
    if cfg.cuda_graph and device.type != "cuda":
        raise QattuneError(f"cuda_graph=true replays CUDA graphs; device={device} has none (set device=cuda, "
                           "or cuda_graph=false)")
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, checkpoint_config(cfg.checkpoint_dir).vocab_size, cfg.checkpoint_dir)
    model = load_model(cfg.checkpoint_dir, device=device, dtype=resolve_dtype(cfg.dtype, device),
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
