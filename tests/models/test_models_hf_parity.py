"""qattune's logits equal transformers' for the same random tiny checkpoint (Llama and Qwen2 families)."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from qattune.checkpoint import HFCheckpointer, build_model_from_checkpoint  # noqa: E402

torch.set_num_threads(1)

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-5)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip

CASES = {
    "llama": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_1_rope_scaling": (
        "llama", dict(num_key_value_heads=2, rope_theta=500_000.0, rope_scaling=LLAMA3_ROPE)
    ),
    "qwen2_5_bias_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
}


def make_hf_model(family: str, options: dict):
    if family == "llama":
        config, cls = transformers.LlamaConfig(**BASE, **options), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**BASE, **options), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # random norms, biases and weights of order 1: every parameter shows in the logits
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 and p.numel() == 64 else 0))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, options = CASES[case]
    hf = make_hf_model(family, options)
    hf.save_pretrained(tmp_path)
    checkpointer = HFCheckpointer(str(tmp_path))
    model = build_model_from_checkpoint(checkpointer).eval()
    assert model.weights_tied() == options.get("tie_word_embeddings", False)
    assert (model.layers[0].attn.q_proj.bias is not None) == (family == "qwen2")

    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 48))  # past original_max_position_embeddings: scaling matters
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = model(tokens)
    assert expected.abs().max() > 1.0  # logits are not trivially small
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()

    # HF -> qattune -> HF: the same tensor names and values, and transformers reads the config back
    saved = checkpointer.save(model.state_dict(), tmp_path / "saved")
    original, again = load_file(tmp_path / "model.safetensors"), load_file(saved / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    reloaded = type(hf).from_pretrained(saved).eval()
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def test_rope_scaling_changes_logits(tmp_path):
    """Guards the scaling test above: without the llama3 rope_scaling the logits differ."""
    family, options = CASES["llama3_1_rope_scaling"]
    hf = make_hf_model(family, options)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500_000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = build_model_from_checkpoint(HFCheckpointer(str(tmp_path))).eval()
    tokens = torch.randint(0, 128, (1, 48))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() > 1e-3
