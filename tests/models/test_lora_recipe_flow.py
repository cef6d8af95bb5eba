"""The qat_lora order end to end: lora builder -> split_lora -> load base -> prepare (fake quant) -> apply_lora
-> train; only adapters change, and the merged checkpoint is the loaded base plus the scaled LoRA product."""

import torch
import torch.nn.functional as F

from qattune.checkpoint import HFCheckpointer, build_model_from_checkpoint, write_hf_checkpoint
from qattune.models import apply_lora, get_adapter, llama, lora_llama, lora_state_dict, merged_state_dict, split_lora
from qattune.quant import FakeQuantLinear, QATQuantizer

torch.set_num_threads(1)

DIMS = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            max_seq_len=64)  # fmt: skip


def test_prepare_then_lora_trains_adapters_only(tmp_path):
    torch.manual_seed(0)
    pretrained = llama(**DIMS)
    write_hf_checkpoint(pretrained.state_dict(), pretrained.config, get_adapter("llama"), tmp_path, 10**9)
    checkpoint = {k: v.clone() for k, v in pretrained.state_dict().items()}

    with torch.device("meta"):  # what instantiating the config's model gives the recipe
        lora_model = lora_llama(**DIMS, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True,
                                apply_lora_to_output=True, lora_rank=4, lora_alpha=16.0)  # fmt: skip
    base, lora = split_lora(lora_model)
    model = build_model_from_checkpoint(HFCheckpointer(str(tmp_path)), lambda: base)
    QATQuantizer("8da4w", group_size=32).prepare(model)
    apply_lora(model, **lora.to_dict())
    assert isinstance(model.layers[1].mlp.up_proj.base, FakeQuantLinear)
    assert isinstance(model.output.base, FakeQuantLinear)  # 8da4w quantizes the head by default

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    data = torch.randint(0, 128, (4, 17))
    losses = []
    for _ in range(4):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 128), data[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(lora_state_dict(model))

    adapters = lora_state_dict(model)
    merged = merged_state_dict(model)
    assert list(merged) == list(checkpoint)
    lora_layers = {k.rsplit(".", 1)[0] for k in adapters}
    for key, value in checkpoint.items():
        layer = key.removesuffix(".weight")
        if layer in lora_layers:
            update = adapters[f"{layer}.lora_b"] @ adapters[f"{layer}.lora_a"] * (16.0 / 4)
            assert torch.allclose(merged[key], value + update, atol=1e-6, rtol=0), key
            assert update.abs().max() > 1e-3
        else:
            assert torch.equal(merged[key], value), key
