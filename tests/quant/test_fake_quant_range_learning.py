"""Range learning: first-batch initialisation, LSQ / LSQ+ gradients by hand, learned params reach quantize()."""

import math

import pytest
import torch

from qattune.errors import QattuneError
from qattune.quant.formats import IntAffine
from qattune.quant.range_learning import LearnedRangeFakeQuantizer


def test_initialises_from_the_first_batch_and_matches_dynamic_fake_quant():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    fmt = IntAffine(4, True, 32)
    fq = LearnedRangeFakeQuantizer(fmt, w.shape)
    assert fq.scale.shape == (8, 2) and fq.zero_point is None and not bool(fq.initialized)
    y = fq(w)
    scale, _ = fmt.choose_qparams(w)
    assert torch.equal(fq.scale.detach(), scale) and bool(fq.initialized)
    assert torch.equal(y, fmt.fake_quantize(w))
    fq(w * 3)  # later batches do not re-initialise
    assert torch.equal(fq.scale.detach(), scale)


def test_lsq_scale_gradient_by_hand():
    fmt = IntAffine(4, True, None, per_tensor=True)  # qmin -8, qmax 7
    x = torch.tensor([0.3, -2.6, 9.0, -9.0])
    fq = LearnedRangeFakeQuantizer(fmt, x.shape)
    fq.initialize(x)
    with torch.no_grad():
        fq.scale.fill_(1.0)
    xr = x.clone().requires_grad_(True)
    y = fq(xr)
    assert y.tolist() == pytest.approx([0.0, -3.0, 7.0, -8.0])
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # d y / d s: round(v) - v in range (-0.3, -0.4), qmax = 7 above, qmin = -8 below
    expected = (1 * -0.3 + 2 * -0.4 + 3 * 7 + 4 * -8) / math.sqrt(4 * 7)
    assert fq.scale.grad.item() == pytest.approx(expected, rel=1e-6)
    assert xr.grad.tolist() == [1.0, 2.0, 0.0, 0.0]


def test_lsq_plus_zero_point_gradient_by_hand():
    fmt = IntAffine(4, False, None, signed=False, per_tensor=True)  # codes 0..15
    x = torch.tensor([0.2, 8.0, -2.0, 1.0])
    fq = LearnedRangeFakeQuantizer(fmt, x.shape)
    fq.initialize(x)
    with torch.no_grad():
        fq.scale.fill_(0.5)
        fq.zero_point.fill_(3.4)  # used rounded: 3
    xr = x.clone().requires_grad_(True)
    y = fq(xr)
    # v = 0.4, 16, -4, 2 -> round + 3 = 3, 19, -1, 5 -> clamp 3, 15, 0, 5 -> (q - 3) * 0.5
    assert y.tolist() == [0.0, 6.0, -1.5, 1.0]
    y.sum().backward()
    factor = 1 / math.sqrt(4 * 15)
    assert fq.scale.grad.item() == pytest.approx((-0.4 + (15 - 3) + (0 - 3) + 0.0) * factor, rel=1e-6)
    assert fq.zero_point.grad.item() == pytest.approx(-0.5 * 2 * factor, rel=1e-6)
    assert xr.grad.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_per_group_gradient_factor_uses_the_group_size():
    fq = LearnedRangeFakeQuantizer(IntAffine(4, True, 32), (16, 64))
    assert fq.grad_factor == pytest.approx(1 / math.sqrt(32 * 7))


def test_training_moves_the_scale_and_quantize_uses_it():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    fmt = IntAffine(4, False, 32)
    fq = LearnedRangeFakeQuantizer(fmt, w.shape)
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    for _ in range(5):
        loss = (fq(w) - w).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dynamic_scale, _ = fmt.choose_qparams(w)
    assert not torch.equal(fq.scale.detach(), dynamic_scale)
    q = fq.quantize(w)
    scale, zero = fq.effective_qparams()
    assert torch.equal(q.scale, scale) and torch.equal(q.zero.float(), zero)
    assert torch.equal(fmt.dequantize(q), fq(w).detach())


def test_learned_state_survives_save_and_load():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    fmt = IntAffine(8, False, None)
    trained = LearnedRangeFakeQuantizer(fmt, w.shape)
    trained(w)
    with torch.no_grad():
        trained.scale.mul_(1.5)
    loaded = LearnedRangeFakeQuantizer(fmt, w.shape)
    loaded.load_state_dict(trained.state_dict())
    assert torch.equal(loaded(w * 10), trained(w * 10))  # no re-initialisation from the new batch


def test_wrong_shape_and_non_integer_formats_are_errors():
    fq = LearnedRangeFakeQuantizer(IntAffine(8, False, None), (4, 32))
    with pytest.raises(QattuneError, match="per-tensor format"):
        fq(torch.randn(5, 32))
    from qattune.quant.formats import NF4

    with pytest.raises(QattuneError, match="integer grids only"):
        LearnedRangeFakeQuantizer(NF4(), (4, 64))
    with pytest.raises(QattuneError, match="never run or loaded"):
        LearnedRangeFakeQuantizer(IntAffine(8, True, None), (4, 32)).quantize(torch.randn(4, 32))


def test_per_group_gradients_equal_autograd_through_the_lsq_formula():
    """Reference: LSQ written with plain autograd (straight-through round via detach, gradient scaling
    via the `s * g + (s - s * g).detach()` trick of the LSQ paper)."""
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 0.1
    w[0, 3] = 2.0  # pushes its group's range
    fmt = IntAffine(4, False, 32)  # int4 [-8, 7], asymmetric
    fq = LearnedRangeFakeQuantizer(fmt, w.shape)
    fq.initialize(w)
    with torch.no_grad():
        fq.scale.mul_(0.7)  # force some clipping
        fq.zero_point.add_(0.3)
    upstream = torch.randn(4, 64)
    x = w.clone().requires_grad_(True)
    fq(x).backward(upstream)

    g = fq.grad_factor
    s0 = fq.scale.detach().clone().requires_grad_(True)
    z0 = fq.zero_point.detach().clone().requires_grad_(True)
    xr = w.clone().requires_grad_(True)

    def ste_round(t):
        return t + (torch.round(t) - t).detach()

    s = (s0 * g + (s0 - s0 * g).detach()).reshape(4, 2, 1)
    z = ste_round((z0 * g + (z0 - z0 * g).detach()).clamp(-8, 7)).reshape(4, 2, 1)
    q = torch.clamp(ste_round(xr.reshape(4, 2, 32) * (1.0 / s)) + z, -8, 7)
    reference = ((q - z) * s).reshape(4, 64)
    reference.backward(upstream)

    assert torch.equal(fq(w), reference.detach())
    assert torch.equal(x.grad == 0, xr.grad == 0) and (x.grad == 0).any()  # same clipped elements
    torch.testing.assert_close(x.grad, xr.grad)  # the reference multiplies by (1 / s) * s
    torch.testing.assert_close(fq.scale.grad, s0.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fq.zero_point.grad, z0.grad, rtol=1e-5, atol=1e-7)
    assert (fq.zero_point.grad != 0).any()


def test_range_learning_param_groups_give_the_ranges_their_own_rate():
    from torch import nn

    from qattune.quant import QATQuantizer
    from qattune.quant.range_learning import range_learning_param_groups

    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))
    QATQuantizer("8da4w", group_size=16, range_learning=True).prepare(model)
    model[0].bias.requires_grad_(False)  # frozen parameters go to no group
    rest, learned = range_learning_param_groups(model, lr=1e-6)
    assert learned["lr"] == 1e-6 and "lr" not in rest
    assert {id(p) for p in learned["params"]} == {id(model[0].weight_range_learner.scale),
                                                  id(model[2].weight_range_learner.scale)}
    assert {id(p) for p in rest["params"]} == {id(model[0].weight), id(model[2].weight)}
    with pytest.raises(QattuneError, match="set quantizer.range_learning=true or remove range_learning_lr"):
        range_learning_param_groups(nn.Linear(4, 4), lr=1e-6)


def _group_error(x: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    """Squared error of one group [1, 32] fake-quantized with int4 symmetric qparams (by hand: q = clamp(
    round(x / s), -8, 7))."""
    q = torch.clamp(torch.round(x / scale), -8, 7)
    return ((q * scale - x) ** 2).sum()


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_init_picks_the_least_squared_error_clipping_per_group(symmetric):
    from qattune.quant.range_learning import CLIP_RATIOS, search_clipping_qparams

    torch.manual_seed(0)
    w = torch.randn(64, 256)  # 512 Gaussian groups of 32
    fmt = IntAffine(4, symmetric, 32)
    scale, zero = search_clipping_qparams(fmt, w)
    absmax_scale, absmax_zero = fmt.choose_qparams(w)
    error = lambda s, z: ((fmt.fake_quantize_with_qparams(w, s, z)[0] - w) ** 2).reshape(64, 8, 32).sum(-1)
    chosen = error(scale, zero)
    for ratio in CLIP_RATIOS:  # no candidate does better in any group
        assert torch.all(chosen <= error(*fmt.choose_qparams(w * ratio)))
    # most Gaussian groups do better clipped: their largest values are rare, the grid serves the rest
    assert (scale < absmax_scale).float().mean() > 0.5
    assert chosen.sum() < 0.95 * error(absmax_scale, absmax_zero).sum()
    if symmetric:  # one group by hand
        assert torch.isclose(chosen[0, 0], _group_error(w[0, :32], scale[0, 0], None))


def test_range_init_mse_starts_learned_scales_at_the_search_and_is_checked():
    from qattune.quant import QATQuantizer
    from qattune.quant.range_learning import search_clipping_qparams
    from torch import nn

    torch.manual_seed(0)
    model = QATQuantizer("8da4w", range_learning=True, range_init="mse").prepare(nn.Sequential(nn.Linear(64, 16)))
    learner = model[0].weight_range_learner
    learner.initialize(model[0].weight)
    expected, _ = search_clipping_qparams(learner.fmt, model[0].weight.detach())
    assert torch.equal(learner.scale.detach(), expected)
    with pytest.raises(QattuneError, match="range_init='mse' sets where learned scales start; add range_learning=true"):
        QATQuantizer("8da4w", range_init="mse")
    with pytest.raises(QattuneError, match="range_init='minmax': choose one of absmax, cover, mse"):
        QATQuantizer("8da4w", range_learning=True, range_init="minmax")


def test_cover_init_is_the_smallest_grid_whose_end_codes_hold_the_extremes():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    fmt = IntAffine(4, True, 32)
    scale, zero = fmt.covering_qparams(w)
    groups = w.reshape(64, 8, 32)
    by_hand = torch.maximum(groups.amax(-1) / 7, groups.amin(-1) / -8)  # qmax 7, qmin -8
    assert zero is None and torch.equal(scale, by_hand)
    steps = groups / scale.unsqueeze(-1)
    assert bool((steps <= 7 + 1e-5).all() and (steps >= -8 - 1e-5).all())  # one rounding off at most
    at_top = torch.isclose(steps.amax(-1), torch.tensor(7.0))
    at_bottom = torch.isclose(steps.amin(-1), torch.tensor(-8.0))
    at_an_end = at_top | at_bottom
    assert bool(at_an_end.all())
    _, in_range = fmt.fake_quantize_with_qparams(w, scale, None)
    assert bool(in_range.all())
    # the absmax scale puts a positive absmax on the rounding boundary (7.5 steps): most of them clip
    _, absmax_in_range = fmt.fake_quantize_with_qparams(w, fmt.choose_qparams(w)[0], None)
    clipped_groups = (~absmax_in_range).reshape(64, 8, 32).sum(-1)
    positive_absmax = groups.amax(-1) >= -groups.amin(-1)
    assert int(clipped_groups.max()) == 1 and not bool(clipped_groups[~positive_absmax].any())
    assert int(clipped_groups.sum()) > 0.75 * int(positive_absmax.sum())
    # asymmetric formats cover their range already: their own qparams
    asym = IntAffine(4, False, 32)
    assert all(torch.equal(a, b) for a, b in zip(asym.covering_qparams(w), asym.choose_qparams(w)))
    # bf16 weights of a small model (rows' max / 127 below bf16's eps, 2**-7) get their own scales too
    small = (w * 0.02).to(torch.bfloat16)
    rows = small.float()
    eight_bit = IntAffine(8, True, None)
    expected = torch.maximum(rows.amax(-1) / 127, rows.amin(-1) / -128).reshape(64, 1)
    assert bool((expected < 2 ** -7).all()) and torch.equal(eight_bit.covering_qparams(small)[0], expected)


def test_range_init_cover_starts_learned_scales_there():
    from qattune.quant import QATQuantizer
    from torch import nn

    torch.manual_seed(0)
    quantizer = QATQuantizer("8da4w", range_learning=True, range_init="cover")
    model = quantizer.prepare(nn.Sequential(nn.Linear(64, 16)))
    model(torch.randn(2, 64))  # the first forward initialises the scales
    learner = model[0].weight_range_learner
    assert torch.equal(learner.scale.detach(), learner.fmt.covering_qparams(model[0].weight.detach())[0])


def test_lsq_gradients_on_the_q4_0_grid_with_a_negative_scale_by_hand():
    """Q4_0's grid, codes 0..15 around 8, d = -0.5: values (q - 8) * d run from 3.5 down to -4."""
    from qattune.quant.formats.gguf_blocks import Q4_0Grid

    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([0.3, -2.6, 9.0, -9.0])
    fq = LearnedRangeFakeQuantizer(Q4_0Grid(), x.shape)
    fq.initialize(x)
    with torch.no_grad():
        fq.scale.fill_(-0.5)
    xr = x.clone().requires_grad_(True)
    y = fq(xr)
    # v = x / d = -0.6, 5.2, -18, 18 -> round + 8 = 7, 13, -10, 26 -> clamp 7, 13, 0, 15
    assert y[0, :4].tolist() == [0.5, -2.5, 4.0, -3.5] and not y[0, 4:].any()
    upstream = torch.zeros(1, 32)
    upstream[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y.backward(upstream)
    # d y / d d: round(v) - v in range (-0.4, -0.2), qmin - 8 = -8 below, qmax - 8 = 7 above; 7 positive levels
    expected = (1 * -0.4 + 2 * -0.2 + 3 * -8 + 4 * 7) / math.sqrt(32 * 7)
    assert fq.scale.grad.item() == pytest.approx(expected, rel=1e-6)
    assert xr.grad[0, :4].tolist() == [1.0, 2.0, 0.0, 0.0]
    assert fq.effective_qparams()[0].item() == -0.5
