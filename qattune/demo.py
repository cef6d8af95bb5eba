"""The embedded demo: QAT vs PTQ on a real model, end to end, offline, through the real recipes.

1. fine-tune SmolLM2-135M-Instruct in float on the CPython docs (`smollm2/135M_full`): the bf16 baseline;
2. the same run with 8da4w QAT, qattune's best measured recipe (`smollm2/135M_qat_gptq`: float for
   the first three quarters of the steps, then AWQ scaling of the blocks' channels, GPTQ rounding of
   their weights with one pass of block reconstruction each, GPTQ rounding of the output head, and fake
   quantization for the last quarter, the group scales learned slowly);
3. quantize: PTQ of the float fine-tune, and `convert` of the QAT fine-tune, both to real 8da4w models;
4. evaluate the three side by side on held-out docs (perplexity; share of the PTQ loss QAT recovered);
5. generate an answer with the QAT-quantized model.

Each step is `qattune run <recipe>` in this process, so the demo shows exactly what a user would run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qattune.cli.run import run_command

DEFAULT_PROMPT = "What does the Python `yield` statement do?"
QAT_CONFIG = "smollm2/135M_qat_gptq"


def qat_float_phase(steps: int, config: str = QAT_CONFIG) -> int:
    """`config`'s float phase (`fake_quant_after_n_steps`) for a run of `steps` steps: the same share of
    the run as in the config, which sizes it for its own `max_steps_per_epoch`, leaving at least one
    fake-quantized step (where the ranges are learned)."""
    from qattune.config.loader import load_config

    cfg = load_config(config)
    return min(round(cfg.fake_quant_after_n_steps * steps / cfg.max_steps_per_epoch), steps - 1)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(output_dir: str, steps: int, eval_documents: int, prompt: str = DEFAULT_PROMPT) -> dict:
    """Run the five stages into `output_dir`; returns the evaluation results (also written as JSON)."""
    from qattune.checkpoint.atomic import writable_directory
    from qattune.errors import QattuneError

    if eval_documents < 1:
        raise QattuneError(f"--eval-documents {eval_documents}: the evaluation needs at least 1 document")
    out = writable_directory(output_dir, key="--output-dir").resolve()
    started = time.perf_counter()
    # a demo run again into the same folder replaces the previous demo's checkpoints
    budget = [f"max_steps_per_epoch={steps}", f"run_val_every_n_steps={steps}", "overwrite_output_dir=true"]
    step_dir = f"step_{steps}"

    _banner(f"1/5 float fine-tune of SmolLM2-135M ({steps} steps): the bf16 baseline")
    run_command(["full_finetune", "--config", "smollm2/135M_full", f"output_dir={out}/bf16", *budget])
    float_steps = qat_float_phase(steps)
    _banner(f"2/5 QAT fine-tune, 8da4w group 32 ({steps} steps: {float_steps} float, then AWQ + GPTQ "
            f"with block reconstruction, and {steps - float_steps} fake-quantized)")
    run_command(["qat_distributed", "--config", QAT_CONFIG, f"output_dir={out}/qat", *budget,
                 f"fake_quant_after_n_steps={float_steps}"])
    _banner("3/5 quantize: PTQ of the float fine-tune, convert of the QAT fine-tune (both real 8da4w)")
    run_command(["quantize", "--config", "quantization", f"checkpoint_dir={out}/bf16/{step_dir}",
                 f"output_dir={out}/ptq", "quantizer._component_=qattune.quant.PTQQuantizer"])
    run_command(["quantize", "--config", "quantization", f"checkpoint_dir={out}/qat/{step_dir}",
                 f"output_dir={out}/qat"])
    _banner("4/5 evaluate bf16 vs PTQ vs QAT on held-out documentation")
    checkpoints = (f"checkpoints={{bf16: {out}/bf16/{step_dir}, ptq: {out}/ptq/quantized, "
                   f"qat: {out}/qat/quantized}}")
    run_command(["eval", "--config", "eval", f"output_dir={out}/eval", "~checkpoint_dir", checkpoints,
                 f"perplexity.max_documents={eval_documents}"])
    _banner("5/5 generate with the QAT-quantized model")
    run_command(["generate", "--config", "generation", f"checkpoint_dir={out}/qat/quantized",
                 f"prompt={json.dumps(prompt)}", "max_new_tokens=48"])

    results = json.loads((out / "eval" / "eval_results.json").read_text())
    _summary(results, out, time.perf_counter() - started)
    return results


def _summary(results: dict, out: Path, seconds: float) -> None:
    ppl = {name: metrics["perplexity"] for name, metrics in results["checkpoints"].items()}
    share = results.get("recovered_share", {}).get("qat", {}).get("perplexity")
    _banner(f"Summary ({seconds / 60:.1f} min)")
    print(f"held-out perplexity: bf16 {ppl['bf16']:.3f}   PTQ 8da4w {ppl['ptq']:.3f}   QAT 8da4w {ppl['qat']:.3f}")
    if share is not None:
        print(f"QAT recovered {100 * share:.0f}% of the perplexity PTQ lost")
    else:
        reason = results.get("no_share_reason", {}).get("perplexity") or "PTQ did not degrade perplexity"
        print(f"no recovered share: {reason}, so there was nothing for QAT to recover")
    print(f"outputs: {out} (eval/eval_results.json, eval/eval_comparison.png, qat/quantized, ptq/quantized)")
