"""Block reconstruction after GPTQ (`quantizer.reconstruction_epochs`)."""

import pytest
import torch

from qattune.errors import QattuneError
from qattune.models import llama
from qattune.quant import QATQuantizer
from qattune.models.transformer import rotary_cos_sin
from qattune.quant.block_reconstruction import _channel_weights, fake_quantized_outputs, reconstruct_block
from qattune.quant.gptq import gptq_initialize


def tiny_model():
    torch.manual_seed(0)
    return llama(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                 max_seq_len=64)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 96, (2, 32), generator=g)} for _ in range(n)]


RECONSTRUCTION_LR = 3e-4  # the tiny random model's weights are small: 2e-3 overshoots their grid


def prepared(reconstruction_epochs=0):
    model = tiny_model()
    quantizer = QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover", rounding_init="gptq",
                             gptq_batches=4, reconstruction_epochs=reconstruction_epochs, reconstruction_lr=RECONSTRUCTION_LR)
    quantizer.prepare(model)
    return model, quantizer


def first_block_inputs(model, tokens):
    """`model.layers[0]`'s positional arguments for `tokens` [2, 32] (as the model passes them)."""
    positions = torch.arange(32).unsqueeze(0).expand(2, 32)
    cos, sin = rotary_cos_sin(model.config.rope, positions)
    with torch.no_grad():
        return model.tok_embeddings(tokens), cos, sin, None, positions


def set_fake_quant(module, enabled):
    for m in module.modules():
        if hasattr(m, "fake_quant_enabled"):
            m.fake_quant_enabled = enabled


def test_channel_weights_are_each_channels_inverse_mean_square():
    targets = [torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]), torch.tensor([[[1.0, 2.0]]])]
    # channel 0: (1 + 9 + 1) / 3; channel 1: (4 + 0 + 4) / 3
    assert torch.allclose(_channel_weights(targets), torch.tensor([3 / 11, 3 / 8]))


def test_reconstruction_lowers_each_blocks_error_and_moves_only_the_blocks_linear_weights():
    model, quantizer = prepared(reconstruction_epochs=3)
    calibration = batches(4)
    gptq_only, _ = prepared()  # the same model, GPTQ alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantizer.initialize_rounding(model, iter(calibration))
    gptq_report = gptq_initialize(gptq_only, iter(calibration))
    assert report.reconstruction_ratio < 0.9 and gptq_report.reconstruction_ratio is None
    assert "block reconstruction: blocks' output error" in str(report)
    assert report.error_ratio != gptq_report.error_ratio  # block 1 is rounded on the trained block 0's outputs
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, gptq_only.state_dict()[n])}
    assert moved == {n for n in before if n.startswith("layers.") and n.endswith("proj.weight")}
    # nothing else got a gradient or kept one; the flags are as they were
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.fake_quant_enabled for m in model.modules() if hasattr(m, "fake_quant_enabled"))  # as prepared


def test_reconstruct_block_reports_the_error_before_and_after():
    model, _ = prepared()
    calibration = batches(3)
    gptq_initialize(model, iter(calibration))
    block = model.layers[0]
    inputs = [first_block_inputs(model, calibration[0]["tokens"])]
    set_fake_quant(block, False)
    with torch.no_grad():
        target = [block(*inputs[0]) + 0.01]
    latents = [m.weight for n, m in block.named_modules() if n.endswith("proj")]
    unchanged = reconstruct_block(block, inputs, target, latents, epochs=0)
    assert unchanged.before == unchanged.after > 0 and not unchanged.undone
    start = [latent.detach().clone() for latent in latents]
    # far too high a rate: the error rises, and the latents are put back as they were
    worse = reconstruct_block(block, inputs, target, latents, epochs=3, lr=1.0)
    assert worse.undone and worse.after == worse.before == pytest.approx(unchanged.before)
    assert all(torch.equal(latent, value) for latent, value in zip(latents, start))
    before, after, undone = reconstruct_block(block, inputs, target, latents, epochs=5, lr=2e-3)
    assert before == pytest.approx(unchanged[0]) and after < before and not undone
    assert all(not m.fake_quant_enabled for m in block.modules() if hasattr(m, "fake_quant_enabled"))


def test_the_next_block_sees_the_fake_quantized_outputs_weights_and_activations():
    model, _ = prepared()
    gptq_initialize(model, iter(batches(2)))  # initialises the learned scales
    block = model.layers[0]
    inputs = [first_block_inputs(model, batches(1, seed=1)[0]["tokens"])]
    set_fake_quant(block, False)
    (output,) = fake_quantized_outputs(block, inputs)
    assert all(not m.fake_quant_enabled for m in block.modules() if hasattr(m, "fake_quant_enabled"))
    with torch.no_grad():
        float_output = block(*inputs[0])
        set_fake_quant(block, True)
        assert torch.equal(output, block(*inputs[0]))
        for layer in (block.attn.q_proj, block.mlp.down_proj):  # activations quantized too, not only weights
            layer.activation_fake_quant = None
        assert not torch.equal(output, block(*inputs[0]))
    assert not torch.equal(output, float_output)


def test_reconstruction_options_are_checked():
    with pytest.raises(QattuneError, match="reconstruction_epochs=1 trains each block after GPTQ has rounded it; "
                                           "add rounding_init=gptq"):
        QATQuantizer("8da4w", range_learning=True, reconstruction_epochs=1)
    with pytest.raises(QattuneError, match="reconstruction_epochs=-1, reconstruction_lr=5e-05: give epochs >= 0"):
        QATQuantizer("8da4w", range_learning=True, rounding_init="gptq", reconstruction_epochs=-1)
    with pytest.raises(QattuneError, match="reconstruction_lr=0.0: give epochs >= 0 and a positive learning rate"):
        QATQuantizer("8da4w", range_learning=True, rounding_init="gptq", reconstruction_lr=0.0)


def test_the_report_names_blocks_that_kept_gptqs_rounding():
    from qattune.quant.gptq import GPTQReport

    report = GPTQReport(layers=7, skipped={}, tokens=512, seconds=1.0, error_ratio=0.3, reconstruction_ratio=0.97,
                        reconstruction_undone=2)
    assert str(report).endswith("block reconstruction: blocks' output error 0.97x GPTQ's (2 block(s) kept GPTQ's "
                                "rounding: training raised their error; lower quantizer.reconstruction_lr)")
