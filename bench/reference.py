"""The baseline every ratio is measured against: per-image beam search as in the canonical PyTorch tutorial.

This re-implements, from its published algorithm, ``caption_image_beam_search`` of the tutorial's ``caption.py``
(a-PyTorch-Tutorial-to-Image-Captioning), on our model's modules and weights so it computes the same function as
``core.model.CaptionModel``:

- one image at a time, the k beams as the batch;
- the image's features tiled k times, materialized by indexing at every step (the tutorial's
  ``encoder_out[prev_word_inds[incomplete_inds]]``);
- the attention's encoder projection ``encoder_att(encoder_out)`` recomputed at every step for every beam
  (the tutorial's ``Attention.forward``), and the weighted encoding as ``(encoder_out * alpha).sum(1)``;
- the search decisions are ``core.decode.beam_search(search="tutorial")``'s, the one implementation of the
  tutorial's: at step 1 only beam 0 is expanded; a beam that emits <end> is set aside as complete (k shrinks);
  the search stops when no beam is left or after ``max_len`` steps; the result is the complete sequence with the
  best (unnormalized) score. A set-aside beam stays a row scored -inf (the tutorial drops it from the batch).

The tutorial's own loop is eager PyTorch fp32 on whatever device the image is on; so is this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decode import Encoded, Hypothesis, beam_search
from core.model import CaptionModel, DecoderWithAttention


def tutorial_attention(decoder: DecoderWithAttention, encoder_out: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The tutorial's Attention.forward: encoder_out (k,P,C) tiled per beam, h (k,D) -> awe (k,C), alpha (k,P)."""
    att = decoder.attention
    att1 = att.encoder_att(encoder_out)  # (k, P, A): recomputed every step, for every beam
    att2 = att.decoder_att(h)  # (k, A)
    scores = att.full_att(torch.relu(att1 + att2.unsqueeze(1))).squeeze(2)  # (k, P)
    alpha = torch.softmax(scores, dim=1)  # (k, P)
    awe = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (k, C)
    return awe, alpha


def tutorial_step(
    decoder: DecoderWithAttention, prev_words: Tensor, h: Tensor, c: Tensor, encoder_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decoding step of the tutorial's loop: prev_words (k,), h/c (k,D), encoder_out (k,P,C) tiled.

    Returns log-probabilities (k,V), h, c, alpha (k,P): the same function as ``CaptionModel.step``.
    """
    embeddings = decoder.embedding(prev_words)  # (k, E)
    awe, alpha = tutorial_attention(decoder, encoder_out, h)
    gate = torch.sigmoid(decoder.f_beta(h))  # (k, C)
    awe = gate * awe
    h, c = decoder.decode_step(torch.cat([embeddings, awe], dim=1), (h, c))  # (k, D)
    scores = F.log_softmax(decoder.fc(h), dim=1)  # (k, V); dropout is the identity at inference
    return scores, h, c, alpha


@torch.no_grad()
def tutorial_beam_search(
    decoder: DecoderWithAttention,
    encoder_out: Tensor,
    beam_size: int,
    max_len: int,
    start_id: int,
    end_id: int,
    stats: dict | None = None,
) -> Hypothesis:
    """Beam search for ONE image. encoder_out: the encoder's output for it, (1,S,S,C) or (1,P,C).

    The decisions are core.decode's tutorial search (the one implementation of the tutorial's algorithm); the
    work is the tutorial's: the k beams as the batch, features tiled per beam and ``encoder_att`` recomputed in
    every step. ``stats`` (optional) accumulates the work done: "images", "steps" and "rows" (beams stepped,
    summed over steps), so a benchmark can show that the reference did (at most) the fixed work of the batched
    search.
    """
    encoder_out = encoder_out.reshape(1, -1, encoder_out.shape[-1])  # (1, P, C)
    h, c = decoder.init_hidden_state(encoder_out)  # (1, D) each
    no_att = encoder_out.new_empty(*encoder_out.shape[:2], 0)  # (1, P, 0): tutorial_step recomputes it

    def step(words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, _enc_att: Tensor):
        if stats is not None:
            stats["steps"] = stats.get("steps", 0) + 1
            stats["rows"] = stats.get("rows", 0) + len(words)
        tiled = enc_out[torch.zeros(len(words), dtype=torch.long, device=enc_out.device)]  # (k, P, C): a copy
        return tutorial_step(decoder, words, h, c, tiled)

    (hyp,) = beam_search(Encoded(encoder_out, no_att, h, c), step, beam_size, max_len, start_id, end_id,
                         search="tutorial")
    if stats is not None:
        stats["images"] = stats.get("images", 0) + 1
    return hyp


@torch.no_grad()
def reference_search(
    model: CaptionModel, inputs: Tensor, encode: bool, beam_size: int, max_len: int, start_id: int, end_id: int,
    stats: dict | None = None,
) -> list[Hypothesis]:
    """The tutorial's loop, one image at a time: encode the image alone (``encode``: ``inputs`` are images; else they
    are encoder outputs, (N,P,C) or (N,S,S,C)), then beam search it alone."""
    out = []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1]
        encoder_out = model.encoder(x) if encode else x  # (1, S, S, C) or (1, P, C)
        out.append(tutorial_beam_search(model.decoder, encoder_out, beam_size, max_len, start_id, end_id, stats))
    return out


@torch.no_grad()
def reference_steps(model: CaptionModel, words: Tensor, h: Tensor, c: Tensor, tiled: list[Tensor]) -> None:
    """One tutorial step for each of N images (k rows each): the reference of the decoder-step groups.

    ``tiled[i]`` is image i's features tiled per beam, (k,P,C), as the tutorial holds them mid-search.
    """
    k = tiled[0].shape[0]
    for i, enc in enumerate(tiled):
        rows = slice(i * k, (i + 1) * k)
        tutorial_step(model.decoder, words[rows], h[rows], c[rows], enc)


# ----------------------------------------------------------------------------------------------------- training
def tutorial_decoder_forward(decoder: DecoderWithAttention, encoder_out: Tensor, captions: Tensor,
                             lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The tutorial's ``DecoderWithAttention.forward`` (teacher forcing): one caption per image.

    encoder_out (B,S,S,C) or (B,P,C), captions (B,T), lengths (B,). Sorts by length, then at step t decodes only
    the captions still running (its ``batch_size_t``), with the attention's encoder projection recomputed at every
    step (``tutorial_attention``) and the output layer applied per step. Returns predictions (B,T'-1,V), the
    sorted captions, alphas (B,T'-1,P) and the decode lengths.
    """
    b, c_dim = encoder_out.shape[0], encoder_out.shape[-1]
    encoder_out = encoder_out.reshape(b, -1, c_dim)  # (B, P, C)
    lengths, order = lengths.sort(dim=0, descending=True)
    encoder_out, captions = encoder_out[order], captions[order]
    embeddings = decoder.embedding(captions)  # (B, T, E)
    h, c = decoder.init_hidden_state(encoder_out)  # (B, D) each
    decode_lengths = (lengths - 1).tolist()
    steps = max(decode_lengths)
    predictions = encoder_out.new_zeros(b, steps, decoder.vocab_size)
    alphas = encoder_out.new_zeros(b, steps, encoder_out.shape[1])
    for t in range(steps):
        bt = sum(n > t for n in decode_lengths)
        awe, alpha = tutorial_attention(decoder, encoder_out[:bt], h[:bt])
        awe = torch.sigmoid(decoder.f_beta(h[:bt])) * awe
        h, c = decoder.decode_step(torch.cat([embeddings[:bt, t, :], awe], dim=1), (h[:bt], c[:bt]))
        predictions[:bt, t, :] = decoder.fc(decoder.dropout(h))
        alphas[:bt, t, :] = alpha
    return predictions, captions, alphas, decode_lengths


def tutorial_train_step(model: CaptionModel, optimizer: torch.optim.Optimizer, images: Tensor, captions: Tensor,
                        lengths: Tensor, grad_clip: float = 5.0, alpha_c: float = 1.0) -> float:
    """One step of the tutorial's ``train()`` with its encoder frozen (``fine_tune_encoder=False``), fp32: the
    encoder's forward for every caption (one caption per sample, as its ``CaptionDataset`` yields them), the
    decoder above, cross-entropy over the packed targets + the doubly stochastic regularizer, value clipping,
    Adam. Returns the loss."""
    from torch.nn.utils.rnn import pack_padded_sequence

    features = model.encoder(images)  # (B, S, S, C): the tutorial keeps its encoder in train mode
    scores, sorted_caps, alphas, decode_lengths = tutorial_decoder_forward(model.decoder, features, captions, lengths)
    targets = sorted_caps[:, 1:]
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets) + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    for group in optimizer.param_groups:  # the tutorial's clip_gradient
        for p in group["params"]:
            if p.grad is not None:
                p.grad.data.clamp_(-grad_clip, grad_clip)
    optimizer.step()
    return float(loss.detach())
