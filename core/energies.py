"""The additive attention's energies for training: recomputed block by block in backward instead of stored.

    scores[n, j, p] = full_att(relu(enc_att[n, p] + dec[n, j]))      enc_att (N,P,A), dec (N,k,A) -> (N,k,P)

Plain autograd keeps relu's output for every step of a caption: (N, k, P, A) values, 64 MB a step at 32 images x 5
captions x 196 regions x 512, written in forward and read back three times in backward (relu's mask, full_att's
weight gradient, the sums over k and P). That traffic, not arithmetic, was a quarter of a training step (32 images x
5 captions, one Zen 3 core). Here forward keeps only its inputs, and backward recomputes each block of regions while
it is still in cache: the same values, a few more additions, a fraction of the memory traffic.

Only the teacher-forced training forward uses this (``DecoderWithAttention.forward``); the step that backends export
and trace keeps plain tensor operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_VALUES = 1 << 20  # energies per block (4 MB in fp32): the fastest of 2^18..2^21 on Zen 3 at 8 and 32 images x 5


def _block_rows(enc_att: Tensor, dec: Tensor) -> int:
    """Regions per block for the N x k decoder rows of dec (N,k,A)."""
    return max(1, BLOCK_VALUES // dec.numel())


def _relu_blocks(enc_att: Tensor, dec: Tensor):
    """Yield (p0, relu(enc_att[:, p0:p0+R] + dec) (N,k,R,A)) block by block, each written into one reused buffer."""
    (n, p, a), k, step = enc_att.shape, dec.shape[1], _block_rows(enc_att, dec)
    buffer = enc_att.new_empty(n, k, step, a)  # no allocation per block
    for p0 in range(0, p, step):
        r = buffer[:, :, : min(step, p - p0)]  # (N, k, R, A)
        yield p0, torch.add(enc_att[:, None, p0:p0 + step], dec[:, :, None], out=r).clamp_min_(0)


class _AdditiveEnergies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, enc_att: Tensor, dec: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        (n, p, a), k = enc_att.shape, dec.shape[1]
        ctx.dtypes = enc_att.dtype, dec.dtype, weight.dtype
        dtype = torch.result_type(enc_att, dec)  # bf16 under autocast: the dtype full_att would compute in
        enc_att, dec, w = enc_att.to(dtype), dec.to(dtype), weight.reshape(a).to(dtype)  # w (A,)
        scores = enc_att.new_empty(n, k, p)
        for p0, r in _relu_blocks(enc_att, dec):
            scores[:, :, p0:p0 + r.shape[2]] = r @ w  # (N, k, R)
        ctx.save_for_backward(enc_att, dec, w)
        return scores.add_(bias.to(dtype))  # (N, k, P)

    @staticmethod
    def backward(ctx, grad: Tensor):
        enc_att, dec, w = ctx.saved_tensors
        enc_dtype, dec_dtype, weight_dtype = ctx.dtypes
        (n, _, a), k = enc_att.shape, dec.shape[1]
        grad = grad.to(w.dtype).contiguous()  # (N, k, P)
        # d score / d pre-activation = w where relu passed, 0 elsewhere: w factors out of the sums over k and P,
        # so each block only masks the incoming gradient (one pass) and sums it; w multiplies the totals once.
        g_enc = torch.empty_like(enc_att)  # (N, P, A)
        g_dec = torch.zeros_like(dec, dtype=torch.float32)  # (N, k, A), summed over blocks
        g_w = torch.zeros(a, dtype=torch.float32, device=w.device)
        masked, over_p = enc_att.new_empty(n, k, _block_rows(enc_att, dec), a), dec.new_empty(n, k, a)
        for p0, r in _relu_blocks(enc_att, dec):  # recomputed
            m = masked[:, :, : r.shape[2]]  # (N, k, R, A)
            g_blk = grad[:, :, p0:p0 + r.shape[2], None]  # (N, k, R, 1)
            g_w += (g_blk.reshape(1, -1) @ r.reshape(-1, a)).reshape(a)
            torch.ops.aten.threshold_backward.grad_input(g_blk.expand_as(r), r, 0, grad_input=m)
            torch.sum(m, 1, out=g_enc[:, p0:p0 + r.shape[2]])
            g_dec += torch.sum(m, 2, out=over_p)
        need = ctx.needs_input_grad
        return (g_enc.mul_(w).to(enc_dtype) if need[0] else None,
                g_dec.mul_(w).to(dec_dtype) if need[1] else None,
                g_w.reshape(1, a).to(weight_dtype) if need[2] else None,
                grad.float().sum().reshape(1).to(weight_dtype) if need[3] else None)


def additive_energies(enc_att: Tensor, dec: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """enc_att (N,P,A), dec (N,k,A), full_att's weight (1,A) and bias (1,) -> scores (N,k,P), gradients to all four."""
    return _AdditiveEnergies.apply(enc_att, dec, weight, bias)
