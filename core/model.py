"""Show, Attend and Tell: a ResNet encoder, additive soft attention and an LSTM decoder.

Parameter names follow the canonical PyTorch tutorial (a-PyTorch-Tutorial-to-Image-Captioning), so a
``state_dict`` trained there loads here with ``load_state_dict`` and no renaming:

    Encoder:               resnet.*, (adaptive_pool has no parameters)
    DecoderWithAttention:  attention.{encoder_att,decoder_att,full_att}, embedding, decode_step,
                           init_h, init_c, f_beta, fc

The model exposes the two calls every backend shares (the encode/step contract):

    encode(images [N,3,H,W]) -> Encoded(enc_out [N,P,C], enc_att [N,P,A], h [N,D], c [N,D])
    step(words [M], h [M,D], c [M,D], enc_out [N,P,C], enc_att [N,P,A]) -> logprobs [M,V], h, c, alpha [M,P]

with M = N * k rows grouped image-major. ``enc_att`` (the encoder side of the attention) is computed once per
image in ``encode``, and the k rows of one image attend over that image's features without copying them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from core.cli import flag_field as _f
from core.decode import Encoded
from core.energies import additive_energies
from core.fileio import load_weights_only
from core.step_weights import StepWeight
from core.weights import PretrainedWeightsError, imagenet_state_dict

# Channels of the last conv block: the bottleneck ResNets end in 2048, the basic-block ones in 512.
BACKBONE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
ENERGY_BLOCK = 14336  # attention energies per block of regions: regions x attention_dim (28 x 512)


@dataclass
class ModelConfig:
    """The model's shape. Every field but ``vocab_size`` is a command-line flag of the trainer (help below);
    ``vocab_size`` comes from the data: ``dataclasses.replace(cfg, vocab_size=len(vocab))`` before building."""

    vocab_size: int | None = _f(None, "words in the vocabulary, <pad>/<start>/<end>/<unk> included (from the data)")
    backbone: str = _f("resnet101", "encoder CNN", choices=tuple(BACKBONE_CHANNELS))
    encoded_size: int = _f(14, "the encoder's feature grid is encoded_size x encoded_size regions (P = its square)")
    image_size: int = _f(224, "input side in pixels the model is trained and run at")
    attention_dim: int = _f(512, "attention MLP width")
    embed_dim: int = _f(512, "word embedding size")
    decoder_dim: int = _f(512, "LSTM hidden size")
    dropout: float = _f(0.5, "dropout before the output layer")

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(BACKBONE_CHANNELS)}, got {self.backbone!r}")
        if self.vocab_size is not None and self.vocab_size < 5:
            raise ValueError(f"vocab_size must be at least 5 (4 special tokens + 1 word), got {self.vocab_size}")
        for name in ("encoded_size", "image_size", "attention_dim", "embed_dim", "decoder_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def encoder_dim(self) -> int:
        return BACKBONE_CHANNELS[self.backbone]

    @property
    def num_pixels(self) -> int:
        return self.encoded_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class Encoder(nn.Module):
    """ResNet without its pooling and classifier, average-pooled to an encoded_size x encoded_size grid."""

    def __init__(self, backbone: str = "resnet101", encoded_size: int = 14):
        super().__init__()
        resnet = getattr(torchvision.models, backbone)(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_size, encoded_size))
        self.fine_tune(False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.resnet(images)  # (N, C, H/32, W/32)
        x = self.adaptive_pool(x)  # (N, C, S, S)
        return x.permute(0, 2, 3, 1)  # (N, S, S, C), as the tutorial

    def fine_tune(self, fine_tune: bool = True) -> None:
        """Freeze the encoder; with fine_tune, train conv blocks 2-4 only (block 1 keeps generic edges)."""
        for p in self.resnet.parameters():
            p.requires_grad = False
        for child in list(self.resnet.children())[5:]:  # layer2, layer3, layer4
            for p in child.parameters():
                p.requires_grad = fine_tune


def load_pretrained_encoder(encoder: Encoder, backbone: str, source: str) -> None:
    """Load ImageNet weights into ``encoder.resnet``.

    ``source`` is "imagenet" (torchvision's published file, IMAGENET1K_V2 where it exists, cached under TORCH_HOME,
    sha256-checked: core/weights.py)
    or the path of a local torchvision ResNet state_dict (.pth).
    """
    if source == "imagenet":
        enum = torchvision.models.get_model_weights(backbone)
        weights = getattr(enum, "IMAGENET1K_V2", None) or enum.IMAGENET1K_V1
        state = imagenet_state_dict(weights)  # hash-checked, weights_only (torchvision's loader unpickles code)
    else:
        path = Path(source)
        if not path.is_file():
            raise PretrainedWeightsError(f"encoder weights file not found: {path}")
        try:
            state = load_weights_only(path, map_location="cpu")
        except Exception as e:
            raise PretrainedWeightsError(f"could not read encoder weights {path}: {e}") from e
    # A torchvision state_dict is keyed conv1/bn1/layer1..4/fc; our Sequential is keyed 0..7.
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    remapped = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in names:
            remapped[f"{names.index(head)}.{rest}"] = value
    try:
        encoder.resnet.load_state_dict(remapped, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise PretrainedWeightsError(f"encoder weights from {source} do not fit {backbone}: {detail}") from None


class Attention(nn.Module):
    """Additive (Bahdanau) attention over the P image regions."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, encoder_out: Tensor, decoder_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The tutorial's signature: (B,P,C), (B,D) -> attention-weighted encoding (B,C), alpha (B,P)."""
        return self.attend(encoder_out, self.encoder_att(encoder_out), decoder_hidden)

    def attend(self, enc_out: Tensor, enc_att: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """enc_out (N,P,C), enc_att (N,P,A) precomputed, h (N*k,D) -> awe (N*k,C), alpha (N*k,P)."""
        dec = self.decoder_att(h).view(enc_out.shape[0], -1, enc_att.shape[-1])  # (N, k, A)
        return self._weigh(self._energies(enc_att, dec), enc_out)

    def attend_rows(self, enc_out: Tensor, enc_att: Tensor, dec: Tensor, slots: Tensor, k: int
                    ) -> tuple[Tensor, Tensor]:
        """Teacher forcing over the captions still running: dec (M,A) = decoder_att(h) of the rows at ``slots``
        (M,) of the image-major N x k grid of captions (image slot // k). -> awe (M,C), alpha (M,P).

        The energies and the weighted sum run on the whole grid: the k captions of an image share one read of its
        features, and the ended rows' energies (zeros in, discarded) are the cheap part of a step. With gradients
        on, the energies go through core.energies, which recomputes them in backward instead of storing N x k x P
        x A values per step."""
        n = enc_out.shape[0]
        grid = dec.new_zeros(n * k, dec.shape[1]).index_copy(0, slots, dec).view(n, k, -1)  # (N, k, A)
        if torch.is_grad_enabled():
            scores = additive_energies(enc_att, grid, self.full_att.weight, self.full_att.bias)  # (N, k, P)
        else:
            scores = self._energies(enc_att, grid)
        awe, alpha = self._weigh(scores, enc_out)  # (N*k, C), (N*k, P)
        return awe.index_select(0, slots), alpha.index_select(0, slots)

    def _energies(self, enc_att: Tensor, dec: Tensor) -> Tensor:
        """enc_att (N,P,A), dec (N,k,A) -> scores (N,k,P), in plain tensor operations (what export traces)."""
        # A block of regions at a time, so that the (N, k, P, A) sum stays in cache instead of streaming through
        # memory three times (add, relu, full_att); each energy is computed exactly as a whole would be.
        rows = max(1, ENERGY_BLOCK // enc_att.shape[-1])
        return torch.cat([self.full_att(self.relu(e.unsqueeze(1) + dec.unsqueeze(2))).squeeze(-1)
                          for e in enc_att.split(rows, dim=1)], dim=-1)  # (N, k, P)

    def _weigh(self, scores: Tensor, enc_out: Tensor) -> tuple[Tensor, Tensor]:
        """scores (N,k,P) -> awe (N*k,C), alpha (N*k,P)."""
        alpha = self.softmax(scores)  # (N, k, P)
        awe = torch.bmm(alpha, enc_out)  # (N, k, C): the k rows share their image's features
        return awe.reshape(-1, enc_out.shape[-1]), alpha.reshape(-1, enc_out.shape[1])


class DecoderWithAttention(nn.Module):
    def __init__(
        self,
        attention_dim: int,
        embed_dim: int,
        decoder_dim: int,
        vocab_size: int,
        encoder_dim: int = 2048,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.vocab_size = vocab_size
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate on the attention-weighted encoding
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_weights()

    def init_weights(self) -> None:
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out: Tensor) -> tuple[Tensor, Tensor]:
        mean = encoder_out.mean(dim=1)  # (N, C)
        return self.init_h(mean), self.init_c(mean)  # (N, D) each

    def encode_features(self, enc_out: Tensor) -> Encoded:
        """Everything per image the steps need, computed once: enc_out (N,P,C) -> Encoded."""
        h, c = self.init_hidden_state(enc_out)
        return Encoded(enc_out, self.attention.encoder_att(enc_out), h, c)

    def step_logits(
        self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoder step: words (M,), h/c (M,D) -> logits (M,V), h, c, alpha (M,P)."""
        return self._step(self.embedding(words), h, c, enc_out, enc_att)

    def _recur(self, emb: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        """The recurrent part of a step: attend, gate, LSTM -> h, c (M,D), alpha (M,P)."""
        awe, alpha = self.attention.attend(enc_out, enc_att, h)  # (M, C), (M, P)
        awe = self.sigmoid(self.f_beta(h)) * awe
        h, c = self.decode_step(torch.cat([emb, awe], dim=1), (h, c))  # (M, D) each
        return h, c, alpha

    def _step(self, emb: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        h, c, alpha = self._recur(emb, h, c, enc_out, enc_att)
        return self.fc(self.dropout(h)), h, c, alpha

    def step(self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        logits, h, c, alpha = self.step_logits(words, h, c, enc_out, enc_att)
        return F.log_softmax(logits.float(), dim=-1), h, c, alpha

    def forward(self, encoder_out: Tensor, captions: Tensor, lengths: Tensor, packed: bool = False):
        """Teacher forcing.

        encoder_out (N,P,C) or (N,S,S,C); captions (B,T) starting with <start>, B = N x k: k captions per image,
        image-major; lengths (B,) counting <start> and <end>. Returns logits (B,T'-1,V) predicting
        captions[:, 1:T'] and alphas (B,T'-1,P), both zero on padding, where T' = max(lengths); with ``packed``,
        the same as two PackedSequences, which ``caption_loss`` takes as they are (the training step: building
        the padded logits and picking the real steps back out of them cost a tenth of a step). The k captions of
        an image share its features and their attention projection (computed once per image, not per caption).

        The same arithmetic as ``step`` at every position (tests compare), arranged for training: longest caption
        first, so that the captions still running at step t are the first running[t] rows (as in the tutorial and
        a PackedSequence) and a step computes only those (on captions of 10 to 20 words the padding was a quarter
        of the work; on real ones, whose batch maximum is an outlier, more); the products that do not feed the
        recurrence (the words' share of the LSTM input, the output layer) once over all steps; the three
        projections of h in one product; and the weights multiplied at every step (core.step_weights) get their
        gradient in one product over all steps.
        """
        enc_out = encoder_out.flatten(1, -2)  # (N, P, C)
        k, rest = divmod(captions.shape[0], enc_out.shape[0])
        if rest or k < 1:
            raise ValueError(f"expected k captions per image ({enc_out.shape[0]} images), got {captions.shape[0]}")
        enc_out, enc_att, h, c = self.encode_features(enc_out)
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,): the grid slot of each sorted row
        words = _pack_steps(captions, lengths, order)  # the input word of every step
        E, D, A = self.embedding.embedding_dim, self.decode_step.hidden_size, self.attention.decoder_att.out_features
        lstm = self.decode_step
        w_words, w_awe = lstm.weight_ih.split([E, self.encoder_dim], dim=1)  # (4D, E), (4D, C)
        # Every word's share of the LSTM's input in one product, biases of both halves included; split by step in
        # one call (a slice per step would cost a zero-filled (sum(running), 4D) gradient per step).
        from_words = F.linear(self.embedding(words.data), w_words, lstm.bias_ih + lstm.bias_hh)  # (sum(running), 4D)
        from_words = from_words.split(words.batch_sizes.tolist())  # T'-1 x (m, 4D)
        from_awe = StepWeight(w_awe)  # multiplies the gated attention output at every step
        from_h = StepWeight(torch.cat([lstm.weight_hh, self.f_beta.weight, self.attention.decoder_att.weight]))
        h_bias = torch.cat([self.f_beta.bias, self.attention.decoder_att.bias])  # (C + A,)
        h, c = h[order // k], c[order // k]  # (B, D) each: every caption starts from its image's initial state
        hs, alphas = [], []
        for x in from_words:
            m = x.shape[0]
            h, c = h[:m], c[:m]  # (m, D): the captions that have not ended
            to_gates, to_gate_awe = from_h(h).split([4 * D, h_bias.shape[0]], dim=1)  # (m, 4D), (m, C + A)
            gate, dec = (to_gate_awe + h_bias).split([self.encoder_dim, A], dim=1)  # (m, C), (m, A)
            awe, alpha = self.attention.attend_rows(enc_out, enc_att, dec, order[:m], k)  # (m, C), (m, P)
            gates = x + from_awe(self.sigmoid(gate) * awe) + to_gates  # (m, 4D)
            i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTMCell's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            alphas.append(alpha)
        steps = words._replace(sorted_indices=order, unsorted_indices=torch.argsort(order))
        logits = steps._replace(data=self.fc(self.dropout(torch.cat(hs))))  # (sum(running), V)
        alphas = steps._replace(data=torch.cat(alphas))  # (sum(running), P)
        if packed:
            return logits, alphas
        return (pad_packed_sequence(logits, batch_first=True)[0],  # (B, T'-1, V), back in the callers' order
                pad_packed_sequence(alphas, batch_first=True)[0])  # (B, T'-1, P)


def _pack_steps(words: Tensor, lengths: Tensor, order: Tensor) -> PackedSequence:
    """words (B,T) of captions of ``lengths`` (B,) -> the first lengths - 1 of each (one per decoding step), packed
    in ``order`` (longest first): the layout of the teacher-forcing forward's packed output."""
    return pack_padded_sequence(words[order], (lengths[order] - 1).cpu(), batch_first=True)


def caption_loss(logits: Tensor | PackedSequence, captions: Tensor, lengths: Tensor, alphas: Tensor | PackedSequence,
                 alpha_c: float = 1.0) -> Tensor:
    """Cross-entropy over the real (non-padding) targets + doubly stochastic attention regularization.

    logits and alphas as the decoder's forward returns them: padded (B,T'-1,V) and (B,T'-1,P), or packed."""
    if isinstance(logits, PackedSequence):
        targets = _pack_steps(captions[:, 1:], lengths, logits.sorted_indices).data  # the word each step predicts
        logits, attention = logits.data, pad_packed_sequence(alphas, batch_first=True)[0].sum(dim=1)  # (B, P)
    else:
        steps = logits.shape[1]
        valid = torch.arange(steps, device=lengths.device)[None, :] < (lengths[:, None] - 1)  # (B, T'-1)
        logits, targets, attention = logits[valid], captions[:, 1 : steps + 1][valid], alphas.sum(dim=1)
    ce = F.cross_entropy(logits.float(), targets)
    # Each region should receive about one unit of attention over the whole caption.
    reg = ((1.0 - attention.float()) ** 2).mean()
    return ce + alpha_c * reg


class CaptionModel(nn.Module):
    """Encoder + decoder. Knows nothing of DDP, AMP or export: those wrap it from outside."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is unset: build with dataclasses.replace(cfg, vocab_size=len(vocab))")
        self.cfg = cfg
        self.encoder = Encoder(cfg.backbone, cfg.encoded_size)
        self.decoder = DecoderWithAttention(
            attention_dim=cfg.attention_dim,
            embed_dim=cfg.embed_dim,
            decoder_dim=cfg.decoder_dim,
            vocab_size=cfg.vocab_size,
            encoder_dim=cfg.encoder_dim,
            dropout=cfg.dropout,
        )

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor, packed: bool = False):
        """images (B,3,S,S); captions (B*k,T), lengths (B*k,): k captions per image, image-major."""
        # The encoder runs once per image; each of its k captions is decoded on the same features.
        return self.decoder(self.encoder(images), captions, lengths, packed)  # features (B, S', S', C)

    def encode(self, images: Tensor) -> Encoded:
        # Contiguous once here, so that no backend copies the permuted features at every step.
        return self.decoder.encode_features(self.encoder(images).flatten(1, 2).contiguous())

    def step(self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        return self.decoder.step(words, h, c, enc_out, enc_att)

