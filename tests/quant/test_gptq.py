"""GPTQ rounding as QAT's start: codes against the textbook (OBS) form of GPTQ, latents, the model pass."""

import copy

import pytest
import torch

from qattune.errors import QattuneError
from qattune.models import llama
from qattune.quant import QATQuantizer
from qattune.quant.formats import IntAffine
from qattune.quant.gptq import gptq_initialize, gptq_latents, output_error

QMIN, QMAX = -8, 7


def reference_gptq_codes(w, h, s, z, qmin, qmax, damp, act_order):
    """GPTQ as Optimal Brain Quantization states it: round one column, move every other weight of the
    row by `-err * Hinv[i, j] / Hinv[i, i]`, then eliminate column i from the inverse Hessian (Schur
    complement). No Cholesky factor, no lazy batches: an independent route to the same codes."""
    w, h = w.clone().double(), h.clone().double()
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    h = h + damp * torch.diag(h).mean() * torch.eye(w.shape[1], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    codes = torch.empty_like(w)
    for i in order.tolist():
        q = torch.round(w[:, i] * (1.0 / s[:, i])) + (0 if z is None else z[:, i])
        q = q.clamp(qmin, qmax)
        codes[:, i] = q
        rounded = (q - (0 if z is None else z[:, i])) * s[:, i]
        err = (w[:, i] - rounded) / hinv[i, i]
        w -= err.unsqueeze(1) * hinv[i].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


def codes_of(latent, s, z, qmin, qmax):
    q = torch.round(latent * (1.0 / s)) + (0 if z is None else z)
    return q.clamp(qmin, qmax)


def correlated_inputs(n_tokens, features, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64) / features ** 0.5
    x = torch.randn(n_tokens, features, generator=g, dtype=torch.float64) @ (torch.eye(features, dtype=torch.float64) + 2 * mix)
    return x * torch.linspace(0.2, 3.0, features, dtype=torch.float64)  # uneven energy: act_order matters


def group_scales(w, group, qmax=QMAX):
    absmax = w.abs().reshape(w.shape[0], -1, group).amax(-1)
    return (absmax / qmax).repeat_interleave(group, dim=1), absmax / qmax


@pytest.mark.parametrize("act_order", [False, True])
def test_latents_round_to_the_textbook_gptq_codes(act_order):
    torch.manual_seed(0)
    w = torch.randn(12, 64, dtype=torch.float64)
    x = correlated_inputs(512, 64)
    h = x.T @ x
    s_full, s = group_scales(w, 16)
    latent = gptq_latents(w, h, s, None, QMIN, QMAX, damp=0.01, act_order=act_order, block_size=24)
    expected = reference_gptq_codes(w, h, s_full, None, QMIN, QMAX, 0.01, act_order)
    assert torch.equal(codes_of(latent, s_full, None, QMIN, QMAX), expected)
    nearest = codes_of(w, s_full, None, QMIN, QMAX)
    assert (expected != nearest).float().mean() > 0.1  # GPTQ really rounds differently


def test_latents_round_to_the_textbook_codes_with_a_zero_point():
    torch.manual_seed(1)
    w = torch.rand(6, 32, dtype=torch.float64) * 2 + 0.5  # all positive: an asymmetric grid
    x = correlated_inputs(256, 32, seed=1)
    h = x.T @ x
    lo, hi = w.reshape(6, 2, 16).amin(-1), w.reshape(6, 2, 16).amax(-1)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    latent = gptq_latents(w, h, s, z, 0, 15, act_order=True)
    s_full, z_full = s.repeat_interleave(16, dim=1), z.repeat_interleave(16, dim=1)
    expected = reference_gptq_codes(w, h, s_full, z_full, 0, 15, 0.01, True)
    assert torch.equal(codes_of(latent, s_full, z_full, 0, 15), expected)


def test_uncorrelated_inputs_keep_the_weights_as_they_are():
    """With a diagonal Hessian no rounding error is passed on: the latents are the weights."""
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    h = torch.diag(torch.rand(64) + 0.5)
    _, s = group_scales(w, 32)
    assert torch.equal(gptq_latents(w, h, s, None, QMIN, QMAX, act_order=True), w)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error(act_order):
    torch.manual_seed(3)
    w = torch.randn(64, 128)
    x = correlated_inputs(2048, 128).float()
    h = x.T @ x
    fmt = IntAffine(4, True, 32)
    s_full, s = group_scales(w, 32)
    latent = gptq_latents(w, h, s, None, QMIN, QMAX, act_order=act_order)
    gptq, _ = fmt.fake_quantize_with_qparams(latent, s, None)
    nearest, _ = fmt.fake_quantize_with_qparams(w, s, None)
    assert output_error(w, gptq, h) < (0.7 if act_order else 0.85) * output_error(w, nearest, h)
    # the direct definition of the output error: Σ over tokens of |(W - Q) x|²
    direct = ((x.double() @ (w - gptq).double().T) ** 2).sum()
    assert output_error(w, gptq, h) == pytest.approx(float(direct), rel=1e-6)


def test_latents_stay_inside_the_outer_bins_so_none_is_clipped():
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    x = correlated_inputs(512, 64, seed=4).float()
    s = torch.full((16, 2), w.abs().max().item() / 12)  # a fine grid: many weights round past the end codes
    latent = gptq_latents(w, x.T @ x, s, None, QMIN, QMAX)
    steps = latent / s.repeat_interleave(32, dim=1)
    assert steps.max() <= QMAX + 0.49 + 1e-6 and steps.min() >= QMIN - 0.49 - 1e-6
    assert (steps.max() > QMAX) and (steps.min() < QMIN)  # some were pulled in from outside
    _, in_range = IntAffine(4, True, 32).fake_quantize_with_qparams(latent, s, None)
    assert bool(in_range.all())


@pytest.mark.parametrize("dtype, qmin, qmax", [(torch.bfloat16, -128, 127), (torch.bfloat16, QMIN, QMAX),
                                               (torch.float16, -128, 127)])
def test_low_precision_latents_still_round_to_gptqs_codes_unclipped(dtype, qmin, qmax):
    """GPTQ works in float32 on a bf16 weight; the stored latent, cast back, must keep GPTQ's codes (a cast
    across a bin edge flipped 5% of 8-bit codes and lost half of GPTQ's gain) and stay unclipped."""
    torch.manual_seed(5)
    w = (torch.randn(64, 128) * 0.05).to(dtype)
    x = correlated_inputs(512, 128, seed=5).float()
    s = (w.float().abs().amax(1, keepdim=True) / qmax).expand(64, 2)  # two groups of 64 per row
    full = s.repeat_interleave(64, dim=1)
    in_float32 = gptq_latents(w.float(), x.T @ x, s, None, qmin, qmax)  # the same computation, kept in float32
    stored = gptq_latents(w, x.T @ x, s, None, qmin, qmax)
    assert stored.dtype == dtype
    assert torch.equal(codes_of(stored.float(), full, None, qmin, qmax), codes_of(in_float32, full, None, qmin, qmax))
    steps = torch.round(stored.float() * (1.0 / full))
    assert steps.min() >= qmin and steps.max() <= qmax
    assert not torch.equal(in_float32.to(dtype), stored)  # the plain cast did flip some


def tiny_model(tie: bool):
    torch.manual_seed(0)
    model = llama(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                  max_seq_len=64)
    if tie:
        model.output.weight = model.tok_embeddings.weight
    return model


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 96, (2, 32), generator=g)} for _ in range(n)]


def fake_quant_logits(model, batch):
    with torch.no_grad():
        return model(batch["tokens"])


@pytest.mark.parametrize("tie", [False, True])
def test_gptq_initialize_moves_the_block_weights_and_brings_the_model_closer_to_float(tie):
    model = tiny_model(tie)
    calibration = batches(4)
    with torch.no_grad():
        float_logits = [model(b["tokens"]) for b in calibration]
    quantizer = QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover", rounding_init="gptq",
                             gptq_batches=3)
    quantizer.prepare(model)
    nearest_model = copy.deepcopy(model)
    for m in (model, nearest_model):
        quantizer.set_fake_quant(m, False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantizer.initialize_rounding(model, iter(calibration))
    assert report.layers == 14 and report.tokens == 3 * 2 * 32  # gptq_batches=3 of the 4
    assert report.error_ratio < 1.0
    head_note = "its weight is tied to another module" if tie else "outside the transformer blocks"
    assert report.skipped == {"output": head_note}
    assert "GPTQ rounding: 14 layers from 192 calibration tokens" in str(report)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    block_weights = {n for n in before if n.startswith("layers.") and n.endswith("proj.weight")}
    # the blocks' Linear weights moved; their scales were initialised (cover) from the weights as loaded
    assert changed == block_weights | {n for n in before if n.startswith("layers.") and n.endswith("learner.scale")}
    assert all(not m.fake_quant_enabled for m in model.modules() if hasattr(m, "fake_quant_enabled"))
    assert model.training
    for m in (model, nearest_model):
        quantizer.set_fake_quant(m, True)
    nearest_model.load_state_dict({k: v for k, v in model.state_dict().items() if "learner" in k}, strict=False)
    err_gptq = sum(float((fake_quant_logits(model, b) - f).square().sum()) for b, f in zip(calibration, float_logits))
    err_nearest = sum(float((fake_quant_logits(nearest_model, b) - f).square().sum())
                      for b, f in zip(calibration, float_logits))
    assert err_gptq < err_nearest


def test_rounding_init_options_are_checked():
    with pytest.raises(QattuneError, match="rounding_init=gptq keeps each group's scale fixed.*add range_learning=true"):
        QATQuantizer("8da4w", rounding_init="gptq")
    with pytest.raises(QattuneError, match="rounding_init='best': choose one of nearest, gptq"):
        QATQuantizer("8da4w", rounding_init="best")
    with pytest.raises(QattuneError, match="gptq_batches=0"):
        QATQuantizer("8da4w", range_learning=True, rounding_init="gptq", gptq_batches=0)
    assert QATQuantizer("8da4w").initialize_rounding(tiny_model(False), iter([])) is None


def test_gptq_initialize_needs_learned_ranges():
    model = tiny_model(False)
    QATQuantizer("8da4w", group_size=32).prepare(model)
    with pytest.raises(QattuneError, match="no layer with learned ranges; set quantizer.range_learning=true"):
        gptq_initialize(model, batches(1))


def test_sequential_calibration_feeds_later_blocks_the_rounded_blocks_outputs():
    """The first block sees the same inputs either way; the second sees block 0's outputs computed with
    rounded weights (sequential) or float ones, so only its latents differ."""
    latents = {}
    for sequential in (True, False):
        model = tiny_model(False)
        QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover").prepare(model)
        gptq_initialize(model, batches(2), sequential=sequential)
        latents[sequential] = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    for name, value in latents[True].items():
        assert torch.equal(value, latents[False][name]) == name.startswith("layers.0."), name


def test_latents_round_to_the_textbook_codes_on_q4_0_grids_with_negative_scales():
    """Q4_0's grid: codes 0..15 around the mid-point 8, with a negative scale for the blocks whose
    largest magnitude is positive (values from 7 d to -8 d)."""
    from qattune.quant.formats.gguf_blocks import Q4_0Grid

    torch.manual_seed(5)
    w = torch.randn(8, 64, dtype=torch.float64)
    x = correlated_inputs(512, 64, seed=5)
    h = x.T @ x
    s, z = Q4_0Grid().choose_qparams(w)
    s, z = s.double(), z.double()
    assert bool((s < 0).any() and (s > 0).any())
    latent = gptq_latents(w, h, s, z, 0, 15, act_order=True, block_size=24)
    s_full, z_full = s.repeat_interleave(32, dim=1), z.repeat_interleave(32, dim=1)
    expected = reference_gptq_codes(w, h, s_full, z_full, 0, 15, 0.01, True)
    assert torch.equal(codes_of(latent, s_full, z_full, 0, 15), expected)
    steps = latent / s_full + 8  # on the code axis: inside the outer bins either way round
    assert steps.max() <= 15 + 0.49 + 1e-9 and steps.min() >= -0.49 - 1e-9


def test_gptq_initialize_on_q4_0_rounds_the_q4_0_layers_only():
    model = tiny_model(False)
    calibration = batches(3)
    with torch.no_grad():
        float_logits = [model(b["tokens"]) for b in calibration]
    quantizer = QATQuantizer("q4_0", range_learning=True, range_init="cover", rounding_init="gptq")
    quantizer.prepare(model)
    nearest_model = copy.deepcopy(model)
    report = quantizer.initialize_rounding(model, iter(calibration))
    assert report.layers == 14 and report.skipped == {}  # the Q8_0 head has no learned ranges: not a target
    assert torch.equal(model.output.weight, nearest_model.output.weight)
    assert torch.equal(model.tok_embeddings.weight, nearest_model.tok_embeddings.weight)
    nearest_model.load_state_dict({k: v for k, v in model.state_dict().items() if "learner" in k}, strict=False)
    err_gptq = sum(float((fake_quant_logits(model, b) - f).square().sum()) for b, f in zip(calibration, float_logits))
    err_nearest = sum(float((fake_quant_logits(nearest_model, b) - f).square().sum())
                      for b, f in zip(calibration, float_logits))
    assert err_gptq < err_nearest


def _rounded_block_weights(model):
    """Each block Linear's weight as nearest rounding of its latent gives it (what calibration computes with)."""
    for name, module in model.named_modules():
        if name.startswith("layers.") and hasattr(module, "weight_range_learner"):
            scale, zero = module.weight_range_learner.effective_qparams()
            rounded, _ = module.weight_range_learner.fmt.fake_quantize_with_qparams(module.weight, scale, zero)
            module.weight.data.copy_(rounded)


@pytest.mark.parametrize("tie", [False, True])
def test_gptq_output_head_rounds_the_head_last_on_the_final_norm_of_the_rounded_blocks(tie):
    calibration = batches(3)
    models = {}
    for with_head in (False, True):
        model = tiny_model(tie)
        quantizer = QATQuantizer("8da4w", group_size=32, range_learning=True, range_init="cover",
                                 rounding_init="gptq", gptq_output_head=with_head)
        quantizer.prepare(model)
        models[with_head] = (model, quantizer.initialize_rounding(model, iter(calibration)))
    (plain, _), (rounded, report) = models[False], models[True]
    assert report.layers == 15 and report.skipped == {} and report.head_error_ratio < 0.9
    assert ("; output head: " in str(report)) and ("the token embedding moved with it" in str(report)) == tie
    for name, value in plain.state_dict().items():  # the head goes last: the blocks round as before
        if name.startswith("layers."):
            assert torch.equal(value, rounded.state_dict()[name]), name
    if tie:  # one parameter: the token embedding moved with the head
        assert rounded.output.weight is rounded.tok_embeddings.weight
    # independently: the head's Hessian from the final norm's outputs, block weights rounded, in float
    hidden = []
    handle = plain.output.register_forward_hook(lambda module, args, out: hidden.append(args[0].reshape(-1, 64)))
    quantizer.set_fake_quant(plain, False)
    _rounded_block_weights(plain)
    with torch.no_grad():
        for batch in calibration:
            plain(batch["tokens"])
    handle.remove()
    x = torch.cat(hidden).double()
    plain.output.weight_range_learner.initialize(plain.output.weight)  # cover, from the weight as loaded
    scale, _ = plain.output.weight_range_learner.effective_qparams()
    expected = gptq_latents(plain.output.weight.detach().double(), x.T @ x, scale.double(), None, QMIN, QMAX)
    s_full = scale.repeat_interleave(32, dim=1)
    assert torch.equal(codes_of(rounded.output.weight.detach(), s_full, None, QMIN, QMAX),
                       codes_of(expected.float(), s_full, None, QMIN, QMAX))


def test_gptq_output_head_options_are_checked():
    with pytest.raises(QattuneError, match="gptq_output_head rounds the head in GPTQ's calibration pass; add rounding"):
        QATQuantizer("8da4w", range_learning=True, gptq_output_head=True)
    with pytest.raises(QattuneError, match="rounds the output head, which scheme 8da4w leaves in float here"):
        QATQuantizer("8da4w", range_learning=True, rounding_init="gptq", gptq_output_head=True, quantize_output=False)
    model = tiny_model(False)  # q4_0's Q8_0 head keeps dynamic scales: nothing for GPTQ to hold fixed
    quantizer = QATQuantizer("q4_0", range_learning=True, rounding_init="gptq", gptq_output_head=True)
    quantizer.prepare(model)
    with pytest.raises(QattuneError, match="needs the output head .* fake-quantized with learned ranges"):
        quantizer.initialize_rounding(model, iter(batches(1)))
