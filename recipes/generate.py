"""Generate text with KV-cache decoding from a float or quantized checkpoint.

    qattune run generate --config generation checkpoint_dir=out/quantized prompt="What is a generator?"
    qattune run generate --config generation checkpoint_dir=out/quantized prompts='[Hello, What is 2+2?]'

`checkpoint_dir` is a Hugging Face folder, a training `step_N`, a `quantize` output, or a .gguf file; or,
as in torchtune's generation configs, `checkpointer` (with an optional `model` builder) reads a float
checkpoint instead (exactly one of the two ways). `prompt` is one text, or torchtune's chat prompt
`{system: ..., user: ...}` (system may be null, or set instead by `system_prompt`, not by both);
`prompts`, when set, replaces it: several texts decode together in one batch. With `chat: true` each
text is a user message sent through the tokenizer's chat format. Greedy by default (`temperature: 0`,
which ignores `top_k` and `top_p`); `temperature` > 0 samples, with `top_k`, `top_p`.
`dtype` is the compute dtype, for quantized checkpoints too (their packed codes and scales stay as stored).
The device, the sampling options and the tokenizer (against the model's vocabulary) are checked before
the model loads.
"""

from typing import Literal, Optional, Union

from qattune.config import Component, RecipeConfig, Unsupported, recipe_main

KV_CACHE = "qattune always decodes with a KV cache (the same tokens, faster); remove enable_kv_cache"
QUANTIZER = ("generate loads real quantized models: convert the checkpoint with `qattune run quantize`, then set "
             "checkpoint_dir to its output_dir/quantized and remove quantizer")
PROMPT_KEYS = ("system", "user")


class Config(RecipeConfig):
    checkpoint_dir: Optional[str] = None  # or torchtune's checkpointer (+ model), not both
    checkpointer: Optional[Component] = None  # reads a float checkpoint (torchtune's generation configs)
    model: Optional[Component] = None  # the builder checkpointer loads into; default: the checkpoint's config
    tokenizer: Component
    prompt: Optional[Union[str, dict]] = None  # a text, or torchtune's {system: ..., user: ...}
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
    enable_kv_cache: Unsupported(KV_CACHE, accept=(True,)) = True  # torchtune's; qattune always uses one
    quantizer: Unsupported(QUANTIZER, accept=(None,)) = None  # torchtune's; null only
    output_dir: Optional[str] = None  # torchtune's generation configs set it; generate writes no file


def _chat_prompt(cfg) -> Optional[dict]:
    """torchtune's `prompt: {system, user}`, checked; None when prompt is a text or `prompts` replaces it."""
    from collections.abc import Mapping

    from qattune.config.suggest import did_you_mean
    from qattune.errors import QattuneError

    if cfg.prompts is not None or not isinstance(cfg.prompt, Mapping):
        return None
    prompt = dict(cfg.prompt)
    for key, value in prompt.items():
        if key not in PROMPT_KEYS:
            raise QattuneError(f"prompt.{key}: unknown key; torchtune's chat prompt is {{system: ..., user: ...}}."
                               f"{did_you_mean(key, PROMPT_KEYS)}")
        if value is not None and not isinstance(value, str):
            raise QattuneError(f"prompt.{key}: expected a text, got {value!r}")
    if not cfg.chat:
        raise QattuneError("prompt={system, user} is a chat prompt: set chat=true, or give prompt as a text")
    if prompt.get("system") is not None and cfg.system_prompt is not None:
        raise QattuneError("prompt.system and system_prompt both set the system message; keep one")
    return prompt


def _texts(cfg, chat_prompt: Optional[dict]) -> list[str]:
    """The texts to generate from: `prompts` when set (it replaces `prompt`), else `prompt` (its `user`)."""
    from qattune.errors import QattuneError

    if cfg.prompts is not None:
        key, texts = "prompts", list(cfg.prompts)
    elif chat_prompt is not None:
        key, texts = "prompt.user", [chat_prompt.get("user") or ""]
    else:
        key, texts = "prompt", [cfg.prompt]
    texts = [text for text in texts if text is not None]
    if not texts:
        raise QattuneError("nothing to generate from: set prompt=\"...\" or prompts=[...]")
    for index, text in enumerate(texts):
        if not text:
            where = f"prompts[{index}]" if key == "prompts" else key
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
    from qattune.checkpoint import checkpoint_config, checkpoint_source, load_model
    from qattune.config import instantiate
    from qattune.errors import QattuneError
    from qattune.generation import check_tokenizer_fits, generate_text
    from qattune.training.distributed import parse_device
    from qattune.training.precision import resolve_dtype

    chat_prompt = _chat_prompt(cfg)
    texts = _texts(cfg, chat_prompt)
    _check_sampling(cfg)
    device = parse_device(cfg.device or "cpu")
    if cfg.cuda_graph and device.type != "cuda":
        raise QattuneError(f"cuda_graph=true replays CUDA graphs; device={device} has none (set device=cuda, "
                           "or cuda_graph=false)")
    source = checkpoint_source(cfg.checkpoint_dir, cfg.checkpointer, cfg.model)
    if source is None:
        raise QattuneError("nothing to load: set checkpoint_dir=PATH, or torchtune's checkpointer (and model)")
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, checkpoint_config(source).vocab_size, str(source))
    model = load_model(source, device=device, dtype=resolve_dtype(cfg.dtype, device),
                       keep_dequantized=cfg.keep_dequantized)
    if cfg.chat:
        given = (chat_prompt or {}).get("system")
        system_prompt = given if given is not None else cfg.system_prompt
        # an empty system message is one: it replaces a template's default system prompt, as in HF and torchtune
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
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
