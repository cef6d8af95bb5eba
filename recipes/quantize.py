"""Convert a float or QAT-trained checkpoint to a real quantized model (and a GGUF file for q4_0/q8_0).

    qattune run quantize --config quantization checkpointer.checkpoint_dir=out/step_1000

The checkpoint (Hugging Face folder, Meta, GGUF with `checkpointer=qattune.checkpoint.GGUFCheckpointer`,
or a qattune training output `step_N`) is loaded through `checkpointer`; `quantizer.convert` replaces its
layers by packed quantized ones. A QAT run's learned ranges (`extra_state.safetensors`) are loaded into a
range-learning `prepare` first, so `convert` uses them. The quantizer options must be those the checkpoint
was trained with (`qattune_training.json`): scheme, group size, activation/embedding/output quantization
and include/exclude filters; a difference is refused before any weight is read, with the overrides that
fix it in this config's spelling (`match_training: false` quantizes it with other options on purpose: PTQ
of its weights, without its learned ranges). PTQ with GPTQ rounding: a float checkpoint, `quantizer.range_learning:
true` and `quantizer.rounding_init: gptq` (and `quantizer.awq_scaling: true` to scale the blocks' channels
first, AWQ), calibrated on `dataset` (e.g. the fine-tune's training split) through `tokenizer`.
Writes `output_dir/quantized/`: model.safetensors (a head tied to the embedding stored once) +
quantization_config.json (qattune's eval and generate load it), config.json (with a `quantization_config`
that makes transformers refuse the folder instead of loading random weights) and tokenizer files, and for
q4_0/q8_0 `model-<scheme>.gguf`.
"""

from typing import Literal, Optional

from qattune.config import Component, RecipeConfig, recipe_main

QUANTIZED_DIR = "quantized"


class Config(RecipeConfig):
    output_dir: str
    checkpoint_dir: Optional[str] = None  # the shipped configs read it in checkpointer.checkpoint_dir
    checkpointer: Component
    quantizer: Component
    model: Optional[Component] = None  # default: the model the checkpoint's own config describes
    tokenizer: Optional[Component] = None  # for the tokenizer files and the GGUF tokenizer metadata
    device: Optional[str] = None  # default cpu
    dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "fp32"
    gguf: Optional[bool] = None  # default: true for q4_0 / q8_0
    gguf_float_type: Literal["f32", "f16", "bf16"] = "f16"  # tensors GGUF keeps in float (not norms)
    dataset: Optional[Component("tokenizer")] = None  # calibration text for quantizer.rounding_init=gptq
    batch_size: int = 2  # calibration batch size (quantizer.gptq_batches batches are read)
    seed: Optional[int] = None  # torch.manual_seed(seed) before the model loads and calibrates; null: unseeded
    # false: quantize a QAT checkpoint with other options than it trained with (PTQ of its weights; its
    # learned ranges, which belong to its own scheme, are not used)
    match_training: bool = True


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _source_files(checkpointer) -> list:
    """The weight files the checkpoint is read from."""
    if hasattr(checkpointer, "weight_files"):
        return checkpointer.weight_files()
    return [checkpointer.path]


def _float_bytes(model) -> int:
    """Bytes of the float model's tensors (a tied weight counted once)."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())


def _check_input(source, quantizer, quantizer_cfg, match_training: bool) -> bool:
    """Refuse a quantized checkpoint, or (with `match_training`) one trained with other quantizer options
    (scheme, group size, embedding/output/activation quantization, include/exclude filters); returns
    whether the options are those it trained with."""
    from qattune.errors import QattuneError
    from qattune.quant.serialization import CONFIG_FILE
    from qattune.quant.trained_options import agrees_with_training
    from qattune.training.session import TRAINING_INFO_FILE

    if not source.is_dir():
        return True
    if not (source / "config.json").is_file() and (source / "adapter" / "adapter_config.json").is_file():
        raise QattuneError(f"{source} holds only a LoRA adapter (qat_lora's save_adapter_weights_only: true); "
                           "quantize needs the merged model, which qat_lora writes with save_adapter_weights_only=false")
    if (source / CONFIG_FILE).is_file():
        raise QattuneError(f"{source} is already a quantized checkpoint ({CONFIG_FILE}); quantize the float "
                           "checkpoint it came from (a training output_dir/step_N or a float model folder)")
    return agrees_with_training(source / TRAINING_INFO_FILE, quantizer, quantizer_cfg, match_training)


def _checkpointer(cfg):
    """The checkpointer; a .gguf file given to a folder checkpointer is one line naming the GGUF one."""
    from pathlib import Path

    from qattune.config import instantiate
    from qattune.errors import QattuneError

    path = Path(str(cfg.checkpointer.get("checkpoint_dir", ""))).expanduser()
    try:
        return instantiate(cfg.checkpointer)
    except QattuneError:
        if path.suffix == ".gguf" and path.is_file():
            raise QattuneError(f"checkpointer.checkpoint_dir={path} is a GGUF file: read it with "
                               "checkpointer=qattune.checkpoint.GGUFCheckpointer") from None
        raise


def _tied_layers(model) -> dict[str, str]:
    """`{"output": "tok_embeddings"}` when the float model's head is its token embedding."""
    tied = getattr(model, "weights_tied", None)
    return {"output": "tok_embeddings"} if tied is not None and tied() else {}


def _apply_learned_ranges(model, quantizer, extra_state_path, device) -> None:
    """Prepare with range learning and load the QAT run's learned ranges, so `convert` uses them."""
    import dataclasses

    from safetensors.torch import load_file

    from qattune.errors import QattuneError

    quantizer.config = dataclasses.replace(quantizer.config, range_learning=True)
    quantizer.prepare(model)
    ranges = load_file(str(extra_state_path), device=str(device))
    unknown = sorted(set(ranges) - set(model.state_dict()))
    if unknown:
        raise QattuneError(f"{extra_state_path} holds {unknown[0]}, which the prepared model lacks; quantize with "
                           "the quantizer options (include/exclude, embedding, output) the run was trained with")
    model.load_state_dict(ranges, strict=False)
    _start_unlearned_ranges_from_weights(model, extra_state_path.parent)


def _start_unlearned_ranges_from_weights(model, source) -> None:
    """Ranges a run never learned (fake quantization never turned on: it trained in float) start from the
    weights, as PTQ's do; said in one warning."""
    import torch

    unlearned = [module for module in model.modules()
                 if getattr(module, "weight_range_learner", None) is not None
                 and not module.weight_range_learner.is_initialized]
    if not unlearned:
        return
    print(f"warning: {source} trained with range learning, but fake quantization never turned on in that run "
          f"(fake_quant_after_n_steps at or past its last step): {len(unlearned)} layers' ranges were never learned, "
          "so they come from the weights, as in PTQ", flush=True)
    with torch.no_grad():
        for module in unlearned:
            module.weight_range_learner.initialize(module.weight.detach())


def _round_with_gptq(cfg, model, quantizer) -> None:
    """PTQ with GPTQ rounding: prepare with fixed learned ranges, move the block weights to GPTQ's
    roundings calibrated on `dataset`, and start the other layers' ranges (e.g. a tied head) from their
    weights, so `convert` stores GPTQ's codes."""
    from qattune.config import instantiate
    from qattune.data import build_dataloader
    from qattune.errors import QattuneError

    if cfg.dataset is None or cfg.tokenizer is None:
        raise QattuneError("quantizer.rounding_init=gptq calibrates on text: set dataset (e.g. dataset={_component_: "
                           "qattune.data.python_docs_dataset, split: train, max_seq_len: 128}) and tokenizer")
    quantizer.prepare(model)
    dataset = instantiate(cfg.dataset, tokenizer=instantiate(cfg.tokenizer))
    batches = build_dataloader(dataset, batch_size=cfg.batch_size, shuffle=False)
    print(quantizer.initialize_rounding(model, iter(batches), progress=True), flush=True)
    quantizer.set_fake_quant(model, True)


def _tokenizer_gguf_file(cfg, checkpointer):
    """The GGUF file holding the model's tokenizer: the tokenizer's own path, else a GGUF checkpoint."""
    from pathlib import Path

    path = (cfg.tokenizer or {}).get("path")
    if path is not None and str(path).endswith(".gguf") and Path(path).is_file():
        return Path(path)
    return getattr(checkpointer, "path", None) if checkpointer.format == "gguf" else None


def _write_tokenizer_files(cfg, checkpointer, out) -> None:
    """The tokenizer files a loader needs beside the weights: the source folder's, or made from the GGUF."""
    import shutil
    from pathlib import Path

    from qattune.checkpoint.hf import TOKENIZER_FILES
    from qattune.tokenizers import write_hf_tokenizer_files

    source = checkpointer.checkpoint_dir
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, out / name)
    gguf_file = _tokenizer_gguf_file(cfg, checkpointer)
    path = (cfg.tokenizer or {}).get("path")
    if gguf_file is not None:  # written as tokenizer.json, never copied whole (it holds the weights too)
        if not (out / "tokenizer.json").is_file():
            write_hf_tokenizer_files(str(gguf_file), str(out))
    elif path is not None and Path(path).is_file() and not (out / Path(path).name).exists():
        shutil.copy2(path, out / Path(path).name)


def recipe(cfg) -> None:
    from pathlib import Path

    import torch

    from qattune.checkpoint import build_model_from_checkpoint, check_gguf_scheme, export_gguf, gguf_tokenizer_metadata
    from qattune.checkpoint import writable_directory
    from qattune.checkpoint.atomic import atomic_directory
    from qattune.config import instantiate
    from qattune.quant import save_quantized
    from qattune.quant.serialization import WEIGHTS_FILE
    from qattune.training.distributed import parse_device
    from qattune.training.precision import resolve_dtype
    from qattune.training.session import EXTRA_STATE_FILE

    device = parse_device(cfg.device or "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    quantizer = instantiate(cfg.quantizer)
    scheme = getattr(getattr(quantizer, "config", None), "scheme", None)
    want_gguf = cfg.gguf if cfg.gguf is not None else scheme in ("q4_0", "q8_0")
    if want_gguf:
        check_gguf_scheme(str(scheme))
    checkpointer = _checkpointer(cfg)
    source = checkpointer.checkpoint_dir
    as_trained = _check_input(source, quantizer, cfg.quantizer, cfg.match_training)
    out = writable_directory(cfg.output_dir) / QUANTIZED_DIR
    config, adapter = checkpointer.config, checkpointer.adapter
    gguf_tokenizer = None
    if want_gguf:  # before any weight is read: a tokenizer GGUF cannot hold fails here
        gguf_source = _tokenizer_gguf_file(cfg, checkpointer)
        tokenizer = instantiate(cfg.tokenizer) if cfg.tokenizer is not None and gguf_source is None else None
        gguf_tokenizer = gguf_tokenizer_metadata(tokenizer, config.vocab_size, gguf_source)
    builder = (lambda: instantiate(cfg.model)) if cfg.model is not None else None
    model = build_model_from_checkpoint(checkpointer, builder, device=device, dtype=dtype)
    model.eval()
    float_bytes = _float_bytes(model)
    tied = _tied_layers(model)
    extra_state = source / EXTRA_STATE_FILE if source.is_dir() and as_trained else None
    if extra_state is not None and extra_state.is_file():
        print(f"Loading learned quantization ranges from {extra_state}")
        _apply_learned_ranges(model, quantizer, extra_state, device)
    elif getattr(quantizer, "rounding_init", "nearest") == "gptq":
        _round_with_gptq(cfg, model, quantizer)
    quantizer.convert(model)
    if getattr(quantizer, "report", None) is not None:
        print(quantizer.report.layer_table())
        print(quantizer.report)

    gguf_name = f"model-{scheme}.gguf"
    with atomic_directory(out) as tmp:
        base = getattr(checkpointer, "hf_config", None)  # the source's token ids and other config.json keys
        save_quantized(model, tmp, hf_config=adapter.config_to_hf(config, dtype, base), tied_layers=tied)
        _write_tokenizer_files(cfg, checkpointer, tmp)
        if want_gguf:
            export_gguf(model, config, adapter, tmp / gguf_name, gguf_tokenizer, cfg.gguf_float_type,
                        name=Path(cfg.output_dir).name)

    on_disk = sum(Path(f).stat().st_size for f in _source_files(checkpointer))
    after = (out / WEIGHTS_FILE).stat().st_size
    print(f"Size before: {_megabytes(on_disk)} checkpoint on disk ({source}), "
          f"{_megabytes(float_bytes)} float weights ({cfg.dtype})")
    print(f"Size after:  {_megabytes(after)} on disk ({out / WEIGHTS_FILE}); before/after: "
          f"checkpoint {on_disk / after:.2f}x, float weights {float_bytes / after:.2f}x")
    if want_gguf:
        size = (out / gguf_name).stat().st_size
        print(f"GGUF:        {_megabytes(size)} on disk ({out / gguf_name}); before/after: "
              f"checkpoint {on_disk / size:.2f}x, float weights {float_bytes / size:.2f}x")
    print(f"Quantized model ({scheme}) saved in {out}")


if __name__ == "__main__":
    recipe_main(recipe, __file__)
