"""QAT train -> quantize -> eval -> generate through the CLI on tiny configs, with a PTQ baseline beside it."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["max_steps_per_epoch=6", "batch_size=4", "dataset.max_seq_len=64", "dataset_val.max_seq_len=64",
        "run_val_every_n_steps=null", "progress_bar=false"]
BYTES = "tokenizer={_component_: qattune.tokenizers.byte_tokenizer}"


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    qat, float_run = root / "qat", root / "float"
    run_cli("qat_distributed", "--config", "tiny/qat_full", f"output_dir={qat}", "fake_quant_after_n_steps=3", *TINY)
    run_cli("full_finetune", "--config", "tiny/full", f"output_dir={float_run}", *TINY)
    quantize_qat = run_cli("quantize", "--config", "tiny/quantize", f"output_dir={qat}", f"checkpoint_dir={qat}/step_6")
    run_cli("quantize", "--config", "tiny/quantize", f"output_dir={float_run}", f"checkpoint_dir={float_run}/step_6",
            "quantizer._component_=qattune.quant.PTQQuantizer")
    return root, quantize_qat


def test_quantize_reports_layers_and_sizes(runs):
    _, out = runs
    lines = out.splitlines()
    assert [line.split() for line in lines if line.startswith(("tok_embeddings", "layers.", "output "))] == [
        ["tok_embeddings", "260x64", "skipped:", "embedding", "(quantize_embedding=false)"],
        *[[f"layers.0-1.{name}", shape, "int4_sym", "int8_asym"] for name, shape in (
            ("attn.q_proj", "64x64"), ("attn.k_proj", "32x64"), ("attn.v_proj", "32x64"), ("attn.o_proj", "64x64"),
            ("mlp.gate_proj", "192x64"), ("mlp.up_proj", "192x64"), ("mlp.down_proj", "64x192"))],
        ["output", "260x64", "int4_sym", "int8_asym"]]
    assert "qattune convert report, scheme 8da4w: 15 quantized, 1 skipped" in lines
    assert any(line.startswith("Quantized model (8da4w) saved in ") for line in lines)


def test_eval_compares_bf16_ptq_and_qat(runs):
    root, _ = runs
    checkpoints = (f"checkpoints={{bf16: {root}/float/step_6, ptq: {root}/float/quantized, "
                   f"qat: {root}/qat/quantized}}")
    out = run_cli("eval", "--config", "eval", f"output_dir={root}/eval", "~checkpoint_dir", checkpoints, BYTES,
                  "perplexity.max_documents=1", "perplexity.max_seq_len=64")
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split()[:4] == ["metric", "bf16", "ptq", "qat"]
    results = json.loads((root / "eval" / "eval_results.json").read_text())
    assert set(results["checkpoints"]) == {"bf16", "ptq", "qat"}
    ppl = {name: results["checkpoints"][name]["perplexity"] for name in ("bf16", "ptq", "qat")}
    assert all(1.0 < value < 300.0 for value in ppl.values())
    assert set(results["recovered_share"]) == {"qat"} and "perplexity" in results["recovered_share"]["qat"]
    assert (root / "eval" / "eval_comparison.png").stat().st_size > 1000


def test_eval_per_document_adds_each_document_to_the_table_and_shares(runs):
    root, _ = runs
    checkpoints = f"checkpoints={{bf16: {root}/float/step_6, ptq: {root}/float/quantized, qat: {root}/qat/quantized}}"
    common = [BYTES, "perplexity.max_seq_len=64", "perplexity.per_document=true", "plot=false"]
    out = run_cli("eval", "--config", "eval", f"output_dir={root}/eval_docs", "~checkpoint_dir", checkpoints,
                  "perplexity.max_documents=2", *common)
    assert [line.split()[0] for line in out.splitlines() if line.startswith("document_")] == [
        "document_1/perplexity", "document_2/perplexity"]
    results = json.loads((root / "eval_docs" / "eval_results.json").read_text())
    per_document = {m for m in results["checkpoints"]["qat"] if m.startswith("document_")}
    assert per_document == {"document_1/perplexity", "document_2/perplexity"}
    assert per_document <= set(results["recovered_share"]["qat"])
    # a document scores as it does alone: the first document's perplexity is a one-document run's total
    run_cli("eval", "--config", "eval", f"output_dir={root}/eval_first", f"checkpoint_dir={root}/qat/quantized",
            "perplexity.max_documents=1", *common)
    alone = json.loads((root / "eval_first" / "eval_results.json").read_text())["checkpoints"]["model"]
    assert results["checkpoints"]["qat"]["document_1/perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)
    assert alone["document_1/perplexity"] == pytest.approx(alone["perplexity"], rel=1e-12)


def test_eval_prefix_token_id_conditions_every_document(runs):
    """lm-eval's prefix_token_id, e.g. to reproduce its HF backend, which uses an HF tokenizer's bos_token
    even where the model adds none; the default is bos, else eos."""
    from qattune.checkpoint import load_model
    from qattune.eval import load_texts, perplexity
    from qattune.tokenizers import byte_tokenizer

    root, _ = runs
    common = [f"checkpoint_dir={root}/qat/quantized", BYTES, "perplexity.max_documents=1", "perplexity.max_seq_len=64",
              "plot=false"]
    run_cli("eval", "--config", "eval", f"output_dir={root}/eval_prefix", "prefix_token_id=42", *common)
    got = json.loads((root / "eval_prefix" / "eval_results.json").read_text())["checkpoints"]["model"]["perplexity"]
    model, texts = load_model(root / "qat" / "quantized"), load_texts("python_docs", max_documents=1)
    ours = {prefix: perplexity(model, byte_tokenizer(), texts, max_seq_len=64, prefix_token_id=prefix).perplexity
            for prefix in (42, None)}
    assert got == pytest.approx(ours[42], rel=1e-6) and ours[42] != pytest.approx(ours[None], rel=1e-6)
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", "eval", "--config", "eval",
                           f"output_dir={root}/eval_bad", "prefix_token_id=260", *common], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: prefix_token_id=260 is not a token id of the tokenizer (0 to 259); null: its bos, else eos")


def test_generate_from_the_quantized_model(runs):
    root, _ = runs
    out = run_cli("generate", "--config", "generation", f"checkpoint_dir={root}/qat/quantized", BYTES,
                  "chat=false", "prompt='def f'", "max_new_tokens=8")
    assert out.startswith("> def f\n")
    assert "tokens/s" in out.splitlines()[-1]


def test_load_model_reads_each_kind_and_keep_dequantized_is_exact(runs, tmp_path):
    import torch

    from qattune.checkpoint import load_model
    from qattune.errors import QattuneError

    root, _ = runs
    tokens = torch.arange(0, 40).reshape(2, 20)
    with torch.no_grad():
        fresh = load_model(root / "qat" / "quantized")(tokens)
        kept_model = load_model(root / "qat" / "quantized", keep_dequantized=True)
        kept = kept_model(tokens)
        again = kept_model(tokens)
        float_logits = load_model(root / "float" / "step_6")(tokens)
    assert torch.equal(fresh, kept) and torch.equal(kept, again)
    assert not torch.equal(fresh, float_logits)
    with pytest.raises(QattuneError, match="is not a checkpoint qattune can read"):
        load_model(tmp_path)


def test_training_refuses_a_quantized_checkpoint(runs):
    root, _ = runs
    proc = subprocess.run(
        [sys.executable, "-m", "qattune.cli.main", "run", "qat_distributed", "--config", "tiny/qat_full",
         f"output_dir={root}/again", f"checkpointer={{_component_: qattune.checkpoint.HFCheckpointer, "
         f"checkpoint_dir: {root}/qat/quantized}}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: checkpointer.checkpoint_dir={root}/qat/quantized holds a quantized model (quantization_config.json); "
        "training needs a float checkpoint: point it at the training step_N or model the quantized one came from")
