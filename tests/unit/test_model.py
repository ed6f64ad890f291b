"""The model: shapes for every backbone, tutorial compatibility, the loss, and the encode/step contract."""

import pytest
import torch
from torch import nn

from core.model import (
    CaptionModel,
    DecoderWithAttention,
    Encoder,
    ModelConfig,
    PretrainedWeightsError,
    caption_loss,
    load_pretrained_encoder,
)


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=40, backbone="resnet18", encoded_size=3, image_size=64, attention_dim=24, embed_dim=16, decoder_dim=32)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model() -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(small_config()).eval()


CAPTIONS = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 9, 9, 9, 9, 2]])
LENGTHS = torch.tensor([5, 3, 6])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_shapes_and_finite_for_every_backbone(backbone):
    torch.manual_seed(0)
    cfg = small_config(backbone=backbone, encoded_size=2)
    model = CaptionModel(cfg).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        enc = model.encode(images)
        logits, alphas = model(images, CAPTIONS, LENGTHS)
    p, c = cfg.num_pixels, cfg.encoder_dim
    assert enc.enc_out.shape == (3, p, c) and enc.enc_att.shape == (3, p, cfg.attention_dim)
    assert enc.h.shape == enc.c.shape == (3, cfg.decoder_dim)
    assert logits.shape == (3, 5, cfg.vocab_size) and alphas.shape == (3, 5, p)
    assert all(torch.isfinite(t).all() for t in (*enc, logits, alphas))


def test_default_is_resnet101_with_a_14x14_grid():
    cfg = ModelConfig(vocab_size=100)
    assert (cfg.backbone, cfg.encoded_size, cfg.encoder_dim, cfg.num_pixels) == ("resnet101", 14, 2048, 196)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="backbone"):
        small_config(backbone="vgg16")
    with pytest.raises(ValueError, match="dropout"):
        small_config(dropout=1.5)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**small_config().to_dict(), "colour": 3})


# The tutorial's module layout (a-PyTorch-Tutorial-to-Image-Captioning, models.py), reduced to the attributes that
# own parameters, so that its state_dict has exactly the tutorial's keys.
class TutorialAttention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)


class TutorialDecoder(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048):
        super().__init__()
        self.attention = TutorialAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=0.5)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)


class TutorialEncoder(nn.Module):
    def __init__(self, encoded_image_size=14):
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet101(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))


def test_tutorial_state_dicts_load_strictly():
    cfg = ModelConfig(vocab_size=50)
    ours = CaptionModel(cfg)
    decoder = TutorialDecoder(512, 512, 512, 50)
    ours.decoder.load_state_dict(decoder.state_dict(), strict=True)
    ours.encoder.load_state_dict(TutorialEncoder().state_dict(), strict=True)
    assert torch.equal(ours.decoder.fc.weight, decoder.fc.weight)
    assert "decoder.attention.encoder_att.weight" in ours.state_dict()
    assert "encoder.resnet.7.2.conv3.weight" in ours.state_dict()


def test_fine_tune_trains_blocks_2_to_4_only():
    enc = Encoder("resnet18", 2)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.fine_tune(True)
    trainable = {name.split(".")[1] for name, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"5", "6", "7"}  # layer2, layer3, layer4


def test_local_encoder_weights_load(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    enc = Encoder("resnet18", 2)
    load_pretrained_encoder(enc, "resnet18", str(path))
    assert torch.equal(enc.resnet[0].weight, resnet.conv1.weight)
    assert torch.equal(enc.resnet[7][1].conv2.weight, resnet.layer4[1].conv2.weight)
    with pytest.raises(PretrainedWeightsError, match="do not fit resnet50"):
        load_pretrained_encoder(Encoder("resnet50", 2), "resnet50", str(path))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        load_pretrained_encoder(enc, "resnet18", str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_fail_with_a_fix(tmp_path, monkeypatch):
    # An empty cache and a proxy that refuses connections: the download cannot happen, here or anywhere.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained_encoder(Encoder("resnet18", 2), "resnet18", "imagenet")
    msg = str(err.value)
    assert str(tmp_path) in msg and "--encoder-weights" in msg
    assert not list(tmp_path.rglob("*.pth"))


def test_loss_ignores_padding(model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, alphas = model(images, CAPTIONS, LENGTHS)
        loss = caption_loss(logits, CAPTIONS, LENGTHS, alphas)
        noisy = CAPTIONS.clone()
        noisy[0, 5] = noisy[1, 3:] = 17  # overwrite padding only
        logits2, alphas2 = model(images, noisy, LENGTHS)
        assert torch.allclose(loss, caption_loss(logits2, noisy, LENGTHS, alphas2))
        # Shortening a caption changes what is scored.
        shorter = LENGTHS.clone()
        shorter[2] = 4
        logits3, alphas3 = model(images, CAPTIONS, shorter)
        assert not torch.allclose(loss, caption_loss(logits3, CAPTIONS, shorter, alphas3))
    assert torch.all(alphas[1, 2:] == 0)  # no attention recorded past the end of a caption


def test_loss_regularizer_and_gradients():
    torch.manual_seed(0)
    model = CaptionModel(small_config()).train()
    images = torch.randn(3, 3, 64, 64)
    logits, alphas = model(images, CAPTIONS, LENGTHS)
    with_reg = caption_loss(logits, CAPTIONS, LENGTHS, alphas, alpha_c=1.0)
    without = caption_loss(logits, CAPTIONS, LENGTHS, alphas, alpha_c=0.0)
    assert with_reg > without
    with_reg.backward()
    assert model.decoder.fc.weight.grad.abs().sum() > 0
    assert model.decoder.attention.encoder_att.weight.grad.abs().sum() > 0


def test_step_reproduces_teacher_forcing(model):
    """The exported single step and the training forward compute the same function."""
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, alphas = model(images, CAPTIONS, LENGTHS)
        enc_out, enc_att, h, c = model.encode(images)
        for t in range(logits.shape[1]):
            logprobs, h, c, alpha = model.step(CAPTIONS[:, t], h, c, enc_out, enc_att)
            valid = t < LENGTHS - 1  # teacher forcing computes a caption's steps only until it ends
            assert torch.allclose(logprobs[valid], torch.log_softmax(logits[valid, t], -1), atol=1e-5)
            assert torch.allclose(alpha[valid], alphas[valid, t], atol=1e-6)
            assert not logits[~valid, t].any() and not alphas[~valid, t].any()  # zero on padding


def test_beams_share_features_and_match_tiled_attention(model):
    """k rows per image over untiled features == the tutorial's attention over features tiled per row."""
    torch.manual_seed(2)
    n, k = 3, 4
    enc_out, enc_att, _, _ = model.encode(torch.randn(n, 3, 64, 64))
    h = torch.randn(n * k, model.cfg.decoder_dim)
    with torch.no_grad():
        awe, alpha = model.decoder.attention.attend(enc_out, enc_att, h)
        tiled = enc_out.repeat_interleave(k, 0)  # (N*k, P, C)
        awe_ref, alpha_ref = model.decoder.attention(tiled, h)
    assert torch.allclose(alpha, alpha_ref, atol=1e-6)
    assert torch.allclose(awe, awe_ref, atol=1e-5)


def test_encoder_attention_projection_runs_once_per_image(model):
    calls = []
    hook = model.decoder.attention.encoder_att.register_forward_hook(lambda *a: calls.append(1))
    try:
        from core.decode import beam_search

        with torch.no_grad():
            beam_search(model.encode(torch.randn(2, 3, 64, 64)), model.step, beam_size=3, max_len=6, start_id=1, end_id=2)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_teacher_forcing_gradients_match_the_step_by_step_decoder():
    """forward (sorted rows, packed outputs, one weight-gradient product per weight) gives the gradients of the
    plain decoder run step by step over every row: k captions per image of different lengths, unsorted; the
    features' gradient too (the encoder trains through it)."""
    torch.manual_seed(0)
    decoder = DecoderWithAttention(32, 24, 40, 50, encoder_dim=64, dropout=0.0).double()
    features = torch.randn(3, 16, 64, dtype=torch.float64, requires_grad=True)
    inputs = [features, *decoder.parameters()]
    lengths = torch.tensor([4, 9, 3, 11, 6, 6, 11, 2, 5, 8, 7, 3])  # 3 images x 4 captions
    captions = torch.randint(4, 50, (12, 11))
    captions[:, 0] = 1
    logits, alphas = decoder(features, captions, lengths)
    loss = caption_loss(logits, captions, lengths, alphas)
    ours = torch.autograd.grad(loss, inputs)

    e = decoder.encode_features(features)
    h, c = e.h.repeat_interleave(4, 0), e.c.repeat_interleave(4, 0)
    steps, step_alphas = [], []
    for t in range(10):
        step_logits, h, c, alpha = decoder.step_logits(captions[:, t], h, c, e.enc_out, e.enc_att)
        steps.append(step_logits)
        step_alphas.append(alpha)
    valid = (torch.arange(10)[None] < (lengths[:, None] - 1)).double()[..., None]  # (B, T, 1)
    plain = caption_loss(torch.stack(steps, 1), captions, lengths, torch.stack(step_alphas, 1) * valid)
    torch.testing.assert_close(loss, plain)
    packed_logits, packed_alphas = decoder(features, captions, lengths, packed=True)  # the trainer's form
    packed = caption_loss(packed_logits, captions, lengths, packed_alphas)
    torch.testing.assert_close(packed, loss)
    for a, b in zip(torch.autograd.grad(packed, inputs), ours):
        torch.testing.assert_close(a, b)
    for a, b in zip(ours, torch.autograd.grad(plain, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # (caption_loss's cross-entropy runs in fp32)
