"""core.energies: the training path's attention energies equal plain autograd's, values and gradients."""

import pytest
import torch

import core.energies
from core.energies import additive_energies


def _plain(enc_att, dec, weight, bias):
    return torch.relu(enc_att[:, None] + dec[:, :, None]) @ weight[0] + bias  # (N, k, P)


@pytest.mark.parametrize("block_values", [1 << 20, 3 * 2 * 8 * 3], ids=["one-block", "blocks-of-3-regions"])
def test_values_and_gradients_match_autograd(monkeypatch, block_values):
    monkeypatch.setattr(core.energies, "BLOCK_VALUES", block_values)  # several blocks, a short last one
    torch.manual_seed(0)
    inputs = (torch.randn(3, 10, 8), torch.randn(3, 2, 8), torch.randn(1, 8), torch.randn(1))
    inputs = [x.double().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(additive_energies, inputs)
    ours = additive_energies(*inputs)
    torch.testing.assert_close(ours, _plain(*inputs), rtol=0, atol=1e-12)
    g = torch.randn_like(ours)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(ours, inputs, g),
                                                    torch.autograd.grad(_plain(*inputs), inputs, g)))


def test_only_requested_gradients():
    enc_att, dec = torch.randn(2, 5, 4), torch.randn(2, 3, 4, requires_grad=True)
    lin = torch.nn.Linear(4, 1)
    additive_energies(enc_att, dec, lin.weight, lin.bias).sum().backward()
    assert dec.grad is not None and lin.weight.grad is not None and enc_att.grad is None


def test_bf16_autocast_keeps_parameter_gradients_fp32():
    lin = torch.nn.Linear(8, 1)
    enc_att = torch.randn(2, 6, 8, requires_grad=True)
    dec = torch.randn(2, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = additive_energies(enc_att.bfloat16(), dec.bfloat16(), lin.weight, lin.bias)
    assert scores.dtype == torch.bfloat16
    scores.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and enc_att.grad.dtype == torch.float32
    torch.testing.assert_close(scores.float(), _plain(enc_att, dec, lin.weight, lin.bias), atol=0.1, rtol=0.02)
