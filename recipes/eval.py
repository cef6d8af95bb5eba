"""Evaluate bf16, PTQ and QAT checkpoints side by side with lm-eval tasks and perplexity.

    qattune run eval --config eval checkpoint_dir=out/quantized
    qattune run eval --config eval checkpoints='{bf16: out/step_24, ptq: ptq/quantized, qat: out/quantized}'

Each checkpoint (Hugging Face folder, training `step_N`, `quantize` output, or .gguf) gets the built-in
perplexity on `perplexity.source` and the lm-eval `tasks` (names, or tasks in local `task_dirs`, so it
runs offline). `checkpoints`, when set, replaces `checkpoint_dir` (evaluated alone as "model"); as in
torchtune's eleuther_evaluation config, `checkpointer` (with an optional `model` builder) may read one
float checkpoint instead of `checkpoint_dir` (exactly one of the two ways; not with `checkpoints`). With
several checkpoints it prints one table (values ± lm-eval's standard errors where known) and, given a
`baseline` and a `ptq` checkpoint (default: the ones named bf16 and ptq), the share of the PTQ
degradation each other checkpoint recovered ("n/a" where PTQ's loss is within noise, as the table's
footnote says); it writes `output_dir/eval_results.json` (with the standard errors) and a bar chart
`output_dir/eval_comparison.png`. `perplexity.per_document: true` adds each document's perplexity
(`document_<n>/perplexity`, n counted from 1) to all three: which texts lose most, and where QAT wins
back the least. Every checkpoint runs in the compute `dtype` (a quantized one keeps its packed codes and
scales as stored), so a comparison is like with like. lm-eval tasks see at most `max_seq_length` tokens
(torchtune's name for lm-eval's max_length; default the model's max_seq_len, at most 2048) and draw their
few-shot examples and samples from `seed`, the same for every checkpoint. `prefix_token_id` (lm-eval's
model argument) is the token perplexity documents and empty lm-eval contexts are conditioned on: by
default the tokenizer's bos, else its eos; lm-eval's HF backend takes the HF tokenizer's `bos_token` even
where the model adds none (SmolLM2: `<|im_start|>`, 1), so `prefix_token_id=1` reproduces its scores.
Before any model loads, every checkpoint, the tokenizer against each model's vocabulary, the tasks and
the perplexity options are checked. eval_results.json is written again after each checkpoint, so an
evaluation that fails part-way keeps the results of the checkpoints before it (the error says so), whole
(written aside, then renamed), with a `pending` list of the ones not evaluated yet (empty when complete).
"""

from typing import Literal, Optional

from qattune.config import Component, RecipeConfig, Unsupported, recipe_main

KV_CACHE = "lm-eval's generation tasks always decode with a KV cache here (the same tokens, faster); remove enable_kv_cache"
QUANTIZER = ("eval loads real quantized models: convert the checkpoint with `qattune run quantize`, then set "
             "checkpoint_dir to its output_dir/quantized and remove quantizer")


class Config(RecipeConfig):
    output_dir: str
    tokenizer: Component
    checkpoint_dir: Optional[str] = None  # one checkpoint, named "model"
    checkpoints: Optional[dict] = None  # several: {name: path}, replacing checkpoint_dir
    baseline: Optional[str] = None  # the unquantized checkpoint's name; default "bf16" when present
    ptq: Optional[str] = None  # the PTQ checkpoint's name; default "ptq" when present
    checkpointer: Optional[Component] = None  # torchtune's way to name the one float checkpoint, "model"
    model: Optional[Component] = None  # the builder checkpointer loads into; default: the checkpoint's config
    # {source, split, column, max_documents, max_seq_len, stride, per_document}; null: skip
    perplexity: Optional[dict] = None
    tasks: list[str] = []
    task_dirs: list[str] = []
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    max_seq_length: Optional[int] = None  # lm-eval tasks' longest model input; default: the model's, at most 2048
    seed: int = 0  # lm-eval's Python, NumPy, torch and few-shot seeds, the same for every checkpoint
    # the token documents (perplexity) and empty lm-eval contexts are conditioned on; default bos, else eos
    prefix_token_id: Optional[int] = None
    device: Optional[str] = None  # default cpu
    dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "fp32"
    keep_dequantized: bool = True  # quantized layers without a kernel keep their dequantized weight (speed)
    plot: bool = True
    enable_kv_cache: Unsupported(KV_CACHE, accept=(True,)) = True  # torchtune's; qattune always uses one
    quantizer: Unsupported(QUANTIZER, accept=(None,)) = None  # torchtune's; null only


PERPLEXITY_KEYS = ("source", "split", "column", "max_documents", "max_seq_len", "stride", "per_document")
RESULTS_FILE = "eval_results.json"
PLOT_FILE = "eval_comparison.png"
REFERENCE_ROLES = {"baseline": "unquantized", "ptq": "PTQ"}


def _checkpoints(cfg) -> dict:
    """`{name: source}`: `checkpoints` when set (it replaces `checkpoint_dir`), else `{"model": checkpoint_dir}`
    or `{"model": what checkpointer (+ model) reads}`."""
    from qattune.checkpoint import checkpoint_source
    from qattune.errors import QattuneError

    if cfg.checkpoints:
        if cfg.checkpointer is not None or cfg.model is not None:
            raise QattuneError("checkpoints names every checkpoint to compare; model + checkpointer cannot add one: "
                               "add its folder to checkpoints and remove them (~checkpointer ~model)")
        return {str(name): str(path) for name, path in cfg.checkpoints.items()}
    source = checkpoint_source(cfg.checkpoint_dir or None, cfg.checkpointer, cfg.model)
    if source is None:
        raise QattuneError("nothing to evaluate: set checkpoint_dir=PATH, checkpoints={name: path, ...} or "
                           "torchtune's checkpointer (and model)")
    return {"model": source}


def _model_configs(cfg, checkpoints: dict, tokenizer) -> dict:
    """Each checkpoint's model config, after checking it looks loadable, fits the tokenizer and takes
    inputs of `max_seq_length` tokens."""
    from qattune.checkpoint import checkpoint_config
    from qattune.errors import QattuneError
    from qattune.generation import check_tokenizer_fits

    configs = {}
    for name, path in checkpoints.items():
        key = f"checkpoints.{name}" if cfg.checkpoints else "checkpointer" if cfg.checkpointer else "checkpoint_dir"
        try:
            configs[name] = checkpoint_config(path)
            check_tokenizer_fits(tokenizer, configs[name].vocab_size, str(path))
        except QattuneError as err:
            raise QattuneError(f"{key}: {err}") from None
        _check_max_seq_length(cfg.max_seq_length, configs[name].max_seq_len, name)
    return configs


def _check_max_seq_length(length: Optional[int], model_limit: int, name: str) -> None:
    """One line if lm-eval inputs of `length` tokens would not fit the model (or `length` < 1)."""
    from qattune.errors import QattuneError

    if length is not None and not 1 <= length <= model_limit:
        raise QattuneError(f"max_seq_length={length}: lm-eval inputs must be 1 to the model's max_seq_len={model_limit} "
                           f"tokens (checkpoint {name}); set max_seq_length to at most {model_limit} (null: the "
                           "model's own, at most 2048)")


def _perplexity_setup(cfg, configs: dict) -> Optional[dict]:
    """The perplexity texts and options, checked against every model, or None to skip perplexity."""
    from qattune.config.suggest import did_you_mean
    from qattune.errors import QattuneError
    from qattune.eval import load_texts
    from qattune.eval.perplexity import resolve_windows

    if cfg.perplexity is None:
        return None
    options = dict(cfg.perplexity)
    for key in options:
        if key not in PERPLEXITY_KEYS:
            raise QattuneError(f"perplexity.{key}: unknown option.{did_you_mean(key, PERPLEXITY_KEYS)} "
                               f"Options: {', '.join(PERPLEXITY_KEYS)}")
    windows = {"max_seq_len": options.get("max_seq_len"), "stride": options.get("stride")}
    for name, config in configs.items():
        try:
            resolve_windows(windows["max_seq_len"], windows["stride"], config.max_seq_len)
        except QattuneError as err:
            raise QattuneError(f"{err} (checkpoint {name})") from None
    texts = load_texts(options.get("source", "python_docs"), split=options.get("split", "validation"),
                       column=options.get("column", "text"), max_documents=options.get("max_documents"))
    return {"texts": texts, "windows": windows, "per_document": bool(options.get("per_document", False))}


def _flat_stderr(task_results) -> dict[str, float]:
    """`{"task/metric": standard error}`, named as `LmEvalResults.flat()` names the values."""
    return {f"{task}/{name}": value for task, values in task_results.stderr.items() for name, value in values.items()}


def _evaluate(cfg, model, tokenizer, ppl: Optional[dict], task_manager) -> tuple[dict, dict, dict]:
    """One model's metrics, the directions lm-eval reported for its task metrics, and their standard errors."""
    from qattune.eval import lm_eval_model, perplexity, run_lm_eval

    metrics: dict[str, float] = {}
    directions: dict[str, bool] = {}
    errors: dict[str, float] = {}
    if ppl is not None:
        result = perplexity(model, tokenizer, ppl["texts"], batch_size=cfg.batch_size,
                            prefix_token_id=cfg.prefix_token_id, **ppl["windows"])
        print(f"perplexity over {result.documents} document(s), {result.tokens:,} tokens (windows of "
              f"{result.max_seq_len}, stride {result.stride}; perplexity.max_documents sets how many)", flush=True)
        metrics.update(result.metrics())
        if ppl["per_document"]:
            metrics.update(result.per_document_metrics())
    if cfg.tasks:
        lm = lm_eval_model(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_seq_length,
                           prefix_token_id=cfg.prefix_token_id)
        task_results = run_lm_eval(lm, list(cfg.tasks), list(cfg.task_dirs), num_fewshot=cfg.num_fewshot,
                                   limit=cfg.limit, random_seed=cfg.seed, task_manager=task_manager)
        metrics.update(task_results.flat())
        directions.update(task_results.flat_higher_is_better())
        errors.update(_flat_stderr(task_results))
    return metrics, directions, errors


def _warn_unused_max_seq_length(cfg) -> None:
    """`max_seq_length` sizes lm-eval inputs only: say so when there are no tasks to apply it to."""
    import sys

    if cfg.max_seq_length is not None and not cfg.tasks:
        print(f"warning: max_seq_length={cfg.max_seq_length} applies to lm-eval tasks, and none are listed; "
              "perplexity windows are perplexity.max_seq_len", file=sys.stderr)


def _compare(results: dict, references: tuple, directions: dict, errors: dict):
    """The comparison of the checkpoints evaluated so far, against the references among them."""
    from qattune.eval import compare_checkpoints

    baseline, ptq = (name if name in results else None for name in references)
    return compare_checkpoints(results, baseline, ptq, higher_is_better=directions or None, stderr=errors,
                               default_references=False)


def _missing_references_note(comparison) -> Optional[str]:
    """With 3+ checkpoints and no recovered shares: one line saying which of baseline / ptq to set."""
    if len(comparison.checkpoints) < 3 or comparison.recovered:
        return None
    from qattune.eval.compare import DEFAULT_REFERENCES

    unset = [f"{key}=NAME (the {REFERENCE_ROLES[key]} one; default: the one named {default})"
             for key, default in DEFAULT_REFERENCES.items() if getattr(comparison, key) is None]
    return (f"note: no recovered shares without a baseline and a PTQ checkpoint: set {' and '.join(unset)}, "
            f"NAME one of {', '.join(comparison.checkpoints)}")


def _remove_earlier_outputs(out) -> None:
    """An earlier run's results and plot go once this run's checks pass: what the folder holds is this run's."""
    for name in (RESULTS_FILE, PLOT_FILE):
        (out / name).unlink(missing_ok=True)


def recipe(cfg) -> None:
    from qattune.checkpoint import writable_directory
    from qattune.checkpoint import load_model
    from qattune.config import instantiate
    from qattune.errors import QattuneError
    from qattune.eval import check_tasks, plot_comparison
    from qattune.eval.compare import reference_checkpoints
    from qattune.training.distributed import parse_device
    from qattune.training.precision import resolve_dtype

    device = parse_device(cfg.device or "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    checkpoints = _checkpoints(cfg)
    baseline, ptq = reference_checkpoints(list(checkpoints), cfg.baseline, cfg.ptq)
    _warn_unused_max_seq_length(cfg)
    out = writable_directory(cfg.output_dir)
    tokenizer = instantiate(cfg.tokenizer)
    if cfg.prefix_token_id is not None and not 0 <= cfg.prefix_token_id < tokenizer.vocab_size:
        raise QattuneError(f"prefix_token_id={cfg.prefix_token_id} is not a token id of the tokenizer "
                           f"(0 to {tokenizer.vocab_size - 1}); null: its bos, else eos")
    ppl = _perplexity_setup(cfg, _model_configs(cfg, checkpoints, tokenizer))
    task_manager = check_tasks(list(cfg.tasks), list(cfg.task_dirs)) if cfg.tasks else None
    _remove_earlier_outputs(out)
    results: dict[str, dict[str, float]] = {}
    directions: dict[str, bool] = {}
    errors: dict[str, dict[str, float]] = {}
    for name, path in checkpoints.items():
        print(f"Evaluating {name}: {path}", flush=True)
        try:
            model = load_model(path, device=device, dtype=dtype, keep_dequantized=cfg.keep_dequantized)
            metrics, found, errors[name] = _evaluate(cfg, model, tokenizer, ppl, task_manager)
        except QattuneError as err:
            kept = f" (the results of {', '.join(results)} are in {out / RESULTS_FILE})" if results else ""
            raise QattuneError(f"{name}: {err}{kept}") from None
        results[name] = metrics
        directions.update(found)
        del model
        comparison = _compare(results, (baseline, ptq), directions, errors)
        comparison.write_json(out / RESULTS_FILE, pending=[n for n in checkpoints if n not in results])
    print(comparison.table())
    note = _missing_references_note(comparison)
    if note:
        print(note)
    print(f"Wrote {out / RESULTS_FILE}")
    if cfg.plot and len(results) > 1:
        print(f"Wrote {plot_comparison(comparison, out / PLOT_FILE)}")


if __name__ == "__main__":
    recipe_main(recipe, __file__)
