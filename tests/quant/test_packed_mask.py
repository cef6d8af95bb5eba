"""Bit-packed clipped masks (the quantizer's `pack_masks`): the same gradients, an eighth of the bytes."""

import copy

import numpy as np
import pytest
import torch

from qattune.quant import QATQuantizer
from qattune.quant.fake_quant import fake_quantize_ste
from qattune.quant.modules.packed_mask import pack_mask, unpack_mask
from qattune.quant.schemes import SCHEMES


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 13), (2, 1)])
def test_pack_mask_matches_numpy_packbits_and_unpacks_to_the_mask(shape):
    torch.manual_seed(0)
    mask = torch.rand(shape) < 0.3
    packed = pack_mask(mask)
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_mask(packed, shape[-1]), mask)


def _activation_format():
    return SCHEMES["8da4w"].activation(None)


def _ste_grads_and_saved(x: torch.Tensor, in_place: bool, pack: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The STE's input gradient for a fixed upstream gradient, and the tensors it saved."""
    saved: list[torch.Tensor] = []
    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fake_quantize_ste(x, _activation_format(), grad_in_place=in_place, pack_mask=pack)
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype).to(out.device)
    (out * 1).backward(upstream)  # through a product, so the gradient reaching the STE is autograd's own
    return x.grad, saved


# small: eager; large: the fused (compiled) fake quantization
@pytest.mark.parametrize("rows, width, in_place", [(6, 40, False), (6, 40, True), (256, 256, True)])
def test_packed_masks_give_the_same_gradients_and_keep_a_bit_per_element(rows, width, in_place):
    """bf16 per-token int8 activations: a token's maximum often clips by one code (bf16 scales), so
    the mask matters; packed, it zeroes exactly the same gradient elements."""
    torch.manual_seed(1)
    x = (torch.randn(rows, width) * 4).to(torch.bfloat16)
    _, in_range = _activation_format().fake_quantize_with_mask(x)
    assert not in_range.all()  # the case under test: something clipped
    grad_bytes, saved_bytes = _ste_grads_and_saved(x, in_place, pack=False)
    grad_bits, saved_bits = _ste_grads_and_saved(x, in_place, pack=True)
    assert torch.equal(grad_bits, grad_bytes)
    assert torch.equal(grad_bits == 0, ~in_range | (grad_bytes == 0))
    assert [t.dtype for t in saved_bytes] == [torch.bool]
    assert [(t.dtype, tuple(t.shape)) for t in saved_bits] == [(torch.uint8, (rows, width // 8))]


def test_quantizer_pack_masks_trains_like_byte_masks_and_survives_a_copy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    x = (torch.randn(64, 40) * 3).to(torch.bfloat16).requires_grad_(True)
    grads = []
    for pack in (False, True):
        prepared = QATQuantizer("8da4w", group_size=8, pack_masks=pack).prepare(
            copy.deepcopy(model).to(torch.bfloat16))
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = prepared(x).float().square().sum()
        loss.backward()
        grads.append([p.grad for p in prepared.parameters()] + [x.grad])
        x.grad = None
        assert (torch.uint8 in {t.dtype for t in saved}) == pack  # the packed masks, only when asked
    for packed_grad, byte_grad in zip(*grads):
        assert torch.equal(packed_grad, byte_grad)
    assert copy.deepcopy(prepared)[0].activation_fake_quant.pack_masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_masks_on_cuda_match_byte_masks_on_the_fused_path():
    """Large bf16 activations on CUDA take the Triton-compiled packing; the gradients equal the byte
    mask's, and the CPU's."""
    torch.manual_seed(3)
    x = (torch.randn(512, 1024) * 4).to(torch.bfloat16)
    grads = [_ste_grads_and_saved(x.cuda(), True, pack)[0].cpu() for pack in (False, True)]
    assert torch.equal(grads[1], grads[0])
    assert torch.equal(grads[1], _ste_grads_and_saved(x, True, pack=True)[0])
