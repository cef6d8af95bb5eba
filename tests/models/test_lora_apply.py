"""apply_lora / merge_lora / split_lora on a tiny Transformer: float, fake-quantized (QAT) and nf4 (QLoRA) bases."""

# Whole-model logits reach ~75 here, where one float32 ulp is ~8e-6: merged and unmerged models sum the
# same products in another order, so their logits are compared with a relative tolerance of a few ulps.

import pytest
import torch
from torch import nn

from qattune.errors import QattuneError
from qattune.models import (
    LoRALinear,
    apply_lora,
    get_lora_config,
    llama,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    split_lora,
)
from qattune.quant import FakeQuantLinear, PTQQuantizer, QATQuantizer, QuantizedLinear, set_fake_quant

torch.set_num_threads(1)

TINY = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
            max_seq_len=64)  # fmt: skip
ALL = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
           apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0)  # fmt: skip
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return llama(**{**TINY, **options}).eval()


def tokens(seed=1):
    torch.manual_seed(seed)
    return torch.randint(0, 128, (2, 12))


def train_adapters(model, seed=2):
    """Stand-in for training: random B (and A) so every adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, 0.05)


def expected_lora_names(layers=2):
    names = []
    for i in range(layers):
        names += [f"layers.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return sorted(names + ["output"])


def test_only_lora_parameters_are_trainable_and_fresh_model_is_unchanged():
    model = tiny()
    before = model(tokens())
    apply_lora(model, **ALL)
    lora_layers = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert lora_layers == expected_lora_names()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{ab}" for n in lora_layers for ab in ("lora_a", "lora_b"))
    assert torch.equal(model(tokens()), before)
    assert get_lora_config(model).lora_rank == 4


def test_selected_modules_only():
    model = apply_lora(tiny(), lora_attn_modules=["q_proj", "v_proj"], lora_rank=2, lora_alpha=4.0)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == [
        "layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (2 * (64 + 64) + 2 * (64 + 32))


def test_gradients_reach_adapters_only():
    model = apply_lora(tiny(), **ALL)
    train_adapters(model)
    model(tokens()).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if "lora_" in n}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_merge_gives_same_logits_and_plain_state_dict():
    model = apply_lora(tiny(), **ALL)
    train_adapters(model)
    x = tokens()
    unmerged = model(x)
    q = model.layers[1].attn.q_proj
    expected_q = q.base.weight + (q.lora_b @ q.lora_a) * (8.0 / 4)
    assert (unmerged - tiny()(x)).abs().max() > 1e-2  # adapters matter
    state = merged_state_dict(model)
    assert isinstance(model.layers[0].attn.q_proj, LoRALinear)  # merged_state_dict changes nothing
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.layers[1].attn.q_proj) is nn.Linear
    assert list(merged.state_dict()) == list(tiny().state_dict())
    assert list(state) == list(merged.state_dict())
    assert all(torch.equal(state[k], v) for k, v in merged.state_dict().items())
    assert torch.allclose(merged.layers[1].attn.q_proj.weight, expected_q, atol=1e-6, rtol=0)
    assert torch.allclose(merged(x), unmerged, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())


def test_merge_keeps_qkv_bias_and_tied_head():
    model = apply_lora(tiny(qkv_bias=True, tie_embeddings=True), lora_attn_modules=["q_proj", "k_proj"],
                       apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)  # fmt: skip
    train_adapters(model)
    with torch.no_grad():
        model.layers[0].attn.q_proj.base.bias.normal_()
    x = tokens()
    unmerged = model(x)
    merged = merge_lora(model)
    assert merged.weights_tied()
    assert torch.allclose(merged(x), unmerged, atol=1e-5, rtol=1e-5)


def test_split_lora_returns_the_base_and_settings():
    model = apply_lora(tiny(), lora_attn_modules=["v_proj"], apply_lora_to_mlp=True, lora_rank=3, lora_alpha=6.0,
                       lora_dropout=0.1)  # fmt: skip
    base, config = split_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    assert list(base.state_dict()) == list(tiny().state_dict())
    assert all(p.requires_grad for p in base.parameters())
    assert config.to_dict() == dict(lora_attn_modules=["v_proj"], apply_lora_to_mlp=True,
                                    apply_lora_to_output=False, lora_rank=3, lora_alpha=6.0, lora_dropout=0.1)
    again = apply_lora(base, **config.to_dict())
    assert isinstance(again.layers[0].mlp.down_proj, LoRALinear)
    assert again.layers[0].mlp.down_proj.dropout.p == 0.1


def test_lora_state_dict_round_trip_and_errors():
    model = apply_lora(tiny(), lora_attn_modules=["q_proj"], lora_rank=2, lora_alpha=4.0)
    train_adapters(model)
    state = lora_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.attn.q_proj.lora_a": (2, 64), "layers.0.attn.q_proj.lora_b": (64, 2),
        "layers.1.attn.q_proj.lora_a": (2, 64), "layers.1.attn.q_proj.lora_b": (64, 2)}  # fmt: skip
    other = apply_lora(tiny(), lora_attn_modules=["q_proj"], lora_rank=2, lora_alpha=4.0)
    load_lora_state_dict(other, {k: v.clone() for k, v in state.items()})
    assert torch.equal(other(tokens()), model(tokens()))
    with pytest.raises(QattuneError) as err:
        load_lora_state_dict(other, {k: v for k, v in state.items() if "layers.1" not in k})
    assert str(err.value) == "state dict: LoRA tensor 'layers.1.attn.q_proj.lora_a' is missing"
    with pytest.raises(QattuneError) as err:
        load_lora_state_dict(other, {**state, "layers.0.attn.q_proj.lora_a": torch.zeros(3, 64)})
    assert str(err.value) == ("state dict: LoRA tensor 'layers.0.attn.q_proj.lora_a' has shape [3, 64] but the "
                              "model's is [2, 64]; check lora_rank and the model size")  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_attn_modules=["q_proj", "wq"]),
         "lora_attn_modules: unknown module 'wq'; valid names: q_proj, k_proj, v_proj, output_proj"),
        (dict(lora_attn_modules=["o_proj"]),
         "lora_attn_modules: unknown module 'o_proj' (Hugging Face's name; torchtune's and qattune's is "
         "output_proj); valid names: q_proj, k_proj, v_proj, output_proj"),
        (dict(lora_attn_modules=["gate_proj"]),
         "lora_attn_modules: unknown module 'gate_proj' (MLP projections are chosen with apply_lora_to_mlp: "
         "true); valid names: q_proj, k_proj, v_proj, output_proj"),
        (dict(lora_attn_modules=[]),
         "LoRA would adapt nothing: lora_attn_modules is empty and apply_lora_to_mlp and apply_lora_to_output "
         "are false; list e.g. lora_attn_modules: [q_proj, v_proj]"),
        (dict(lora_attn_modules=["q_proj"], lora_rank=0), "lora_rank must be a positive integer, got 0"),
        (dict(lora_attn_modules=["q_proj"], lora_alpha=-1.0), "lora_alpha must be a positive number, got -1.0"),
        (dict(lora_attn_modules=["q_proj"], lora_alpha="big"), "lora_alpha must be a positive number, got 'big'"),
        (dict(lora_attn_modules=["q_proj"], lora_dropout=1.0), "lora_dropout must be in [0, 1), got 1.0"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_clear_line(kwargs, message):
    model = tiny()
    with pytest.raises(QattuneError) as err:
        apply_lora(model, **kwargs)
    assert str(err.value) == message
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_refusals_tied_output_twice_and_non_transformer():
    with pytest.raises(QattuneError) as err:
        apply_lora(tiny(tie_embeddings=True), lora_attn_modules=["q_proj"], apply_lora_to_output=True)
    assert str(err.value) == ("apply_lora_to_output=true, but this model's output head is tied to the token "
                              "embedding; set apply_lora_to_output: false")  # fmt: skip
    model = apply_lora(tiny(), lora_attn_modules=["q_proj"])
    with pytest.raises(QattuneError, match="already has LoRA adapters"):
        apply_lora(model, lora_attn_modules=["v_proj"])
    with pytest.raises(QattuneError) as err:
        apply_lora(nn.Sequential(nn.Linear(4, 4)), lora_attn_modules=["q_proj"])
    assert str(err.value) == ("apply_lora: the model (Sequential) has no module named 'attn.q_proj' "
                              "(qattune Transformer layout expected)")  # fmt: skip
    with pytest.raises(QattuneError, match="has no LoRA adapters; build it with a lora_"):
        split_lora(tiny())


# --- QAT: fake-quantized frozen base (prepare, then apply_lora) -----------------------------------------


def test_lora_over_fake_quantized_base():
    model = tiny()
    x = tokens()
    float_logits = model(x)
    QATQuantizer("8da4w", group_size=32).prepare(model)
    fake_quant_logits = model(x)
    assert (fake_quant_logits - float_logits).abs().max() > 1e-3  # fake quantization is on
    apply_lora(model, **ALL)
    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base, FakeQuantLinear)
    assert torch.equal(model(x), fake_quant_logits)  # fresh adapters change nothing

    train_adapters(model)
    h = torch.randn(2, 5, 64)
    expected = q.base(h) + (h @ q.lora_a.T @ q.lora_b.T) * 2.0
    assert torch.allclose(q(h), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(q.base(h), h @ q.base.weight.T, atol=1e-4)  # the base output is fake-quantized

    model.zero_grad()
    model(x).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, _ in model.named_parameters() if "lora_" in n}

    # set_fake_quant reaches bases inside LoRA layers; with it off the model is float base + adapters
    set_fake_quant(model, False)
    float_lora = model(x)
    assert torch.allclose(q(h), h @ q.base.weight.T + (h @ q.lora_a.T @ q.lora_b.T) * 2.0, atol=1e-5, rtol=0)
    set_fake_quant(model, True)

    # merging folds the adapters into the float master weights: a plain float model, ready for convert
    merged = merge_lora(model)
    assert not any(isinstance(m, (FakeQuantLinear, LoRALinear)) for m in merged.modules())
    assert list(merged.state_dict()) == list(tiny().state_dict())
    assert torch.allclose(merged(x), float_lora, atol=1e-5, rtol=1e-5)
    converted = QATQuantizer("8da4w", group_size=32).convert(merged)
    assert isinstance(converted.layers[0].attn.q_proj, QuantizedLinear)


# --- QLoRA: truly quantized nf4 base ---------------------------------------------------------------------


def nf4_dequantize(w, block=64):
    """NF4 by definition: each block scaled by its absmax, values snapped to the nearest level."""
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(dim=-1)
    return (NF4_LEVELS[nearest] * absmax).reshape(w.shape)


def test_qlora_over_nf4_base():
    model = tiny()
    float_q_weight = model.layers[0].attn.q_proj.weight.detach().clone()
    PTQQuantizer("nf4").convert(model)
    x = tokens()
    quantized_logits = model(x)
    apply_lora(model, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base, QuantizedLinear)
    assert q.lora_a.dtype == torch.float32 and q.lora_a.device.type == "cpu"
    assert torch.equal(model(x), quantized_logits)

    train_adapters(model)
    h = torch.randn(3, 64)
    base_weight = nf4_dequantize(float_q_weight)
    expected = h @ base_weight.T + (h @ q.lora_a.T @ q.lora_b.T) * 2.0
    assert torch.allclose(q(h), expected, atol=1e-5, rtol=0)

    model.zero_grad()
    model(x).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert model.layers[0].attn.q_proj.lora_a.grad.abs().sum() > 0

    unmerged = model(x)
    merged = merge_lora(model)
    assert not any(isinstance(m, (QuantizedLinear, LoRALinear)) for m in merged.modules())
    assert list(merged.state_dict()) == list(tiny().state_dict())
    assert not hasattr(merged, "qattune_quantization")
    expected_q = base_weight + (q.lora_b @ q.lora_a) * 2.0
    assert torch.allclose(merged.layers[0].attn.q_proj.weight, expected_q, atol=1e-6, rtol=0)
    assert torch.equal(merged.layers[0].attn.k_proj.weight, nf4_dequantize(tiny().layers[0].attn.k_proj.weight))
    assert torch.allclose(merged(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_kind", ["fake_quant_8da4w", "nf4"])
def test_bf16_model_gets_bf16_adapters_and_merges_to_bf16(base_kind):
    model = tiny().to(torch.bfloat16)
    if base_kind == "nf4":
        PTQQuantizer("nf4").convert(model)
    else:
        QATQuantizer("8da4w").prepare(model)
    apply_lora(model, lora_attn_modules=["q_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    q = model.layers[0].attn.q_proj
    out = model(tokens())
    out.float().square().mean().backward()
    assert q.lora_a.dtype == q.lora_b.dtype == q.lora_a.grad.dtype == out.dtype == torch.bfloat16
    merged = merge_lora(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
