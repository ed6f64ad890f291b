"""core.step_weights: a weight's gradient summed in one product over the steps equals autograd's step by step."""

import torch

from core.step_weights import StepWeight


def _run(weight, h0, x, step_weight: bool):
    """A small recurrence: h = tanh(x_t @ W.T + h), rows ending along the way (as captions do)."""
    w = StepWeight(weight) if step_weight else (lambda v: v @ weight.t())
    h, out = h0, []
    for t, m in enumerate([4, 4, 3, 1]):
        h = torch.tanh(w(x[t, :m]) + h[:m])
        out.append(h)
    return torch.cat(out).square().sum()


def test_gradients_match_autograd_and_the_tape_is_emptied():
    torch.manual_seed(0)
    weight = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(_run(weight, h0, x, False), (weight, h0, x))
    loss = _run(weight, h0, x, True)
    got = torch.autograd.grad(loss, (weight, h0, x), retain_graph=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    again = torch.autograd.grad(loss, (weight,))[0]  # a second backward sees only its own steps
    torch.testing.assert_close(again, expected[0])


def test_autocast_bf16_multiplies_in_bf16_and_returns_an_fp32_gradient():
    weight = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = StepWeight(weight)(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, torch.ones(3, 6).t() @ x.detach(), atol=0.05, rtol=0.02)
