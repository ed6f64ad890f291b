"""A weight used at every step of a recurrence, whose gradient is one matrix product over all the steps.

Autograd differentiates ``x_t @ W.T`` step by step: at each of T steps it writes a full gradient of W (the LSTM's
2048 x 2560 input weights: 21 MB) from an M-row product, then adds it to the sum, so the time goes to writing
W-sized outputs, not to arithmetic; with a few rows per step (the last, longest captions) a step's weight gradient
cost as much as a full one. Here each step's backward returns only the gradient of its input and keeps its
(x_t, dy_t) pair; once every step has run backward, the weight's gradient is ``cat(dy).T @ cat(x)``: one product
of sum(M) rows, what cuDNN's RNNs do.

    w = StepWeight(linear.weight)      # once per forward, before the loop
    y = w(x)                           # (M, K) -> (M, N) at each step: x @ W.T, no bias
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Tape:
    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (x_t, dy_t) of every step, in backward order


class _Share(torch.autograd.Function):
    """weight -> the weight every step multiplies by (cast once to autocast's dtype); its backward runs after all
    the steps' (they take its output as input) and turns their pairs into the weight's gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, tape: _Tape) -> Tensor:
        ctx.tape, ctx.dtype = tape, weight.dtype
        ctx.set_materialize_grads(False)  # the steps give it no gradient: everything is on the tape
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            return weight.to(torch.get_autocast_dtype(device))
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, _unused):
        pairs, ctx.tape.pairs = ctx.tape.pairs, []
        if not pairs:
            return None, None
        xs, dys = zip(*pairs)
        return (torch.cat(dys).t() @ torch.cat(xs)).to(ctx.dtype), None  # (N, K)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, tape: _Tape) -> Tensor:
        ctx.tape, ctx.x_dtype = tape, x.dtype
        x = x.to(weight.dtype)  # autocast's dtype when it is on (_Share cast the weight)
        ctx.save_for_backward(x, weight)
        return x @ weight.t()  # (M, N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        ctx.tape.pairs.append((x, dy))
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # (M, K)
        return dx, None, None


class StepWeight:
    """``weight`` (N, K) for one forward pass: ``self(x)`` = x @ weight.T for x (M, K), any number of calls."""

    def __init__(self, weight: Tensor):
        self._tape = _Tape()
        self._weight = _Share.apply(weight, self._tape)

    def __call__(self, x: Tensor) -> Tensor:
        return _Step.apply(x, self._weight, self._tape)
