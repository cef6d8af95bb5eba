"""Evaluate bf16, PTQ and QAT checkpoints side by side with lm-eval tasks and perplexity.

    qattune run eval --config eval checkpoint_dir=out/quantized
    qattune run eval --config eval checkpoints='{bf16: out/step_24, ptq: ptq/quantized, qat: out/quantized}'

Each checkpoint (Hugging Face folder, training `step_N`, `quantize` output, or .gguf) gets the built-in
perplexity on `perplexity.source` and the lm-eval `tasks` (names, or tasks in local `task_dirs`, so it
runs offline). With several checkpoints it prints one table and, given `bf16` and `ptq` entries, the
share of the PTQ degradation each other checkpoint recovered; it writes `output_dir/eval_results.json`
and a bar chart `output_dir/eval_comparison.png`. `perplexity.per_document: true` adds each document's
perplexity (`document_<n>/perplexity`, n counted from 1) to all three: which texts lose most, and where
QAT wins back the least.
"""

from typing import Literal, Optional

from qattune.config import Component, RecipeConfig, recipe_main


class Config(RecipeConfig):
    output_dir: str
    tokenizer: Component
    checkpoint_dir: Optional[str] = None  # one checkpoint, named "model"
    checkpoints: Optional[dict] = None  # several: {name: path}; "bf16" and "ptq" name the references
    # {source, split, column, max_documents, max_seq_len, stride, per_document}; null: skip
    perplexity: Optional[dict] = None
    tasks: list[str] = []
    task_dirs: list[str] = []
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    device: Optional[str] = None  # default cpu
    dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "fp32"
    keep_dequantized: bool = True  # quantized layers without a kernel keep their dequantized weight (speed)
    plot: bool = True


PERPLEXITY_KEYS = ("source", "split", "column", "max_documents", "max_seq_len", "stride", "per_document")


def _perplexity_options(cfg) -> Optional[dict]:
    from qattune.config.suggest import did_you_mean
    from qattune.errors import QattuneError

    if cfg.perplexity is None:
        return None
    options = dict(cfg.perplexity)
    for key in options:
        if key not in PERPLEXITY_KEYS:
            raise QattuneError(f"perplexity.{key}: unknown option.{did_you_mean(key, PERPLEXITY_KEYS)} "
                               f"Options: {', '.join(PERPLEXITY_KEYS)}")
    return options


def _checkpoints(cfg) -> dict[str, str]:
    from qattune.errors import QattuneError

    named = dict(cfg.checkpoints or {})
    if cfg.checkpoint_dir:
        named.setdefault("model", cfg.checkpoint_dir)
    if not named:
        raise QattuneError("nothing to evaluate: set checkpoint_dir=PATH or checkpoints={name: path, ...}")
    return named


def recipe(cfg) -> None:
    from pathlib import Path

    from qattune.checkpoint import load_model
    from qattune.config import instantiate
    from qattune.eval import compare_checkpoints, lm_eval_model, load_texts, perplexity, plot_comparison, run_lm_eval
    import torch

    from qattune.training.precision import resolve_dtype

    tokenizer = instantiate(cfg.tokenizer)
    ppl = _perplexity_options(cfg)
    texts, per_document = None, False
    if ppl is not None:
        texts = load_texts(ppl.pop("source", "python_docs"), split=ppl.pop("split", "validation"),
                           column=ppl.pop("column", "text"), max_documents=ppl.pop("max_documents", None))
        per_document = bool(ppl.pop("per_document", False))
    results: dict[str, dict[str, float]] = {}
    directions: dict[str, bool] = {}
    for name, path in _checkpoints(cfg).items():
        print(f"Evaluating {name}: {path}")
        model = load_model(path, device=cfg.device or "cpu", dtype=resolve_dtype(cfg.dtype, torch.device(cfg.device or "cpu")),
                       keep_dequantized=cfg.keep_dequantized)
        metrics: dict[str, float] = {}
        if texts is not None:
            result = perplexity(model, tokenizer, texts, batch_size=cfg.batch_size, **ppl)
            metrics.update(result.metrics())
            if per_document:
                metrics.update(result.per_document_metrics())
        if cfg.tasks:
            lm = lm_eval_model(model, tokenizer, batch_size=cfg.batch_size)
            task_results = run_lm_eval(lm, list(cfg.tasks), list(cfg.task_dirs), num_fewshot=cfg.num_fewshot,
                                       limit=cfg.limit)
            metrics.update(task_results.flat())
            directions.update(task_results.flat_higher_is_better())
        results[name] = metrics
        del model
    comparison = compare_checkpoints(results, higher_is_better=directions or None)
    print(comparison.table())
    out = Path(cfg.output_dir)
    print(f"Wrote {comparison.write_json(out / 'eval_results.json')}")
    if cfg.plot and len(results) > 1:
        print(f"Wrote {plot_comparison(comparison, out / 'eval_comparison.png')}")


if __name__ == "__main__":
    recipe_main(recipe, __file__)
