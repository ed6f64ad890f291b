"""Users of the PyTorch tutorial: import its checkpoints safely, reproduce its captions, default search vs its own.

    .venv/bin/python -m pytest tests/integration/test_tutorial.py -q        # -m "not slow" leaves out the ONNX round trip

The tutorial (a-PyTorch-Tutorial-to-Image-Captioning) is not installed: its ``models.py`` (the classes and the
attribute names that its pickles record) and its ``caption_image_beam_search`` are transcribed below, from its
published code, as the oracle. A checkpoint is built the way its train.py saves one: ``torch.save`` of a dict
holding the whole encoder, decoder and optimizers, pickled as ``models.Encoder`` etc.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from core.checkpoint import load_checkpoint, model_from_checkpoint
from core.decode import Encoded, beam_search
from core.vocab import Vocabulary
from core.import_tutorial import TUTORIAL_MAX_LEN, TutorialImportError, import_tutorial, main

# ------------------------------------------------------------------------------- the tutorial's models.py
TUTORIAL_MODELS = '''
import torch
import torchvision
from torch import nn


class Encoder(nn.Module):
    def __init__(self, encoded_image_size=14, backbone="resnet101"):
        super(Encoder, self).__init__()
        self.enc_image_size = encoded_image_size
        resnet = getattr(torchvision.models, backbone)(weights=None)  # the tutorial: resnet101(pretrained=True)
        modules = list(resnet.children())[:-2]
        self.resnet = nn.Sequential(*modules)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.fine_tune()

    def forward(self, images):
        out = self.resnet(images)
        out = self.adaptive_pool(out)
        out = out.permute(0, 2, 3, 1)
        return out

    def fine_tune(self, fine_tune=True):
        for p in self.resnet.parameters():
            p.requires_grad = False
        for c in list(self.resnet.children())[5:]:
            for p in c.parameters():
                p.requires_grad = fine_tune


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super(Attention, self).__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        att1 = self.encoder_att(encoder_out)
        att2 = self.decoder_att(decoder_hidden)
        att = self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2)
        alpha = self.softmax(att)
        attention_weighted_encoding = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)
        return attention_weighted_encoding, alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super(DecoderWithAttention, self).__init__()
        self.encoder_dim = encoder_dim
        self.attention_dim = attention_dim
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.vocab_size = vocab_size
        self.dropout = dropout
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=self.dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_weights()

    def init_weights(self):
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out):
        mean_encoder_out = encoder_out.mean(dim=1)
        h = self.init_h(mean_encoder_out)
        c = self.init_c(mean_encoder_out)
        return h, c
'''


@torch.no_grad()
def caption_image_beam_search(encoder, decoder, image, word_map, beam_size=3, max_steps=50):
    """The tutorial's caption.py, transcribed (an image tensor instead of a path; the step limit a parameter)."""
    k = beam_size
    vocab_size = len(word_map)
    encoder_out = encoder(image.unsqueeze(0))  # (1, enc_image_size, enc_image_size, encoder_dim)
    enc_image_size = encoder_out.size(1)
    encoder_dim = encoder_out.size(3)
    encoder_out = encoder_out.view(1, -1, encoder_dim)
    num_pixels = encoder_out.size(1)
    encoder_out = encoder_out.expand(k, num_pixels, encoder_dim)
    k_prev_words = torch.LongTensor([[word_map["<start>"]]] * k)
    seqs = k_prev_words
    top_k_scores = torch.zeros(k, 1)
    seqs_alpha = torch.ones(k, 1, enc_image_size, enc_image_size)
    complete_seqs, complete_seqs_alpha, complete_seqs_scores = [], [], []
    step = 1
    h, c = decoder.init_hidden_state(encoder_out)
    while True:
        embeddings = decoder.embedding(k_prev_words).squeeze(1)
        awe, alpha = decoder.attention(encoder_out, h)
        alpha = alpha.view(-1, enc_image_size, enc_image_size)
        gate = decoder.sigmoid(decoder.f_beta(h))
        awe = gate * awe
        h, c = decoder.decode_step(torch.cat([embeddings, awe], dim=1), (h, c))
        scores = decoder.fc(h)
        scores = F.log_softmax(scores, dim=1)
        scores = top_k_scores.expand_as(scores) + scores
        if step == 1:
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
        prev_word_inds = torch.div(top_k_words, vocab_size, rounding_mode="floor")  # the tutorial: `/` (torch 0.4)
        next_word_inds = top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
        seqs_alpha = torch.cat([seqs_alpha[prev_word_inds], alpha[prev_word_inds].unsqueeze(1)], dim=1)
        incomplete_inds = [ind for ind, next_word in enumerate(next_word_inds) if next_word != word_map["<end>"]]
        complete_inds = list(set(range(len(next_word_inds))) - set(incomplete_inds))
        if len(complete_inds) > 0:
            complete_seqs.extend(seqs[complete_inds].tolist())
            complete_seqs_alpha.extend(seqs_alpha[complete_inds].tolist())
            complete_seqs_scores.extend(top_k_scores[complete_inds])
        k -= len(complete_inds)
        if k == 0:
            break
        seqs = seqs[incomplete_inds]
        seqs_alpha = seqs_alpha[incomplete_inds]
        h = h[prev_word_inds[incomplete_inds]]
        c = c[prev_word_inds[incomplete_inds]]
        encoder_out = encoder_out[prev_word_inds[incomplete_inds]]
        top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete_inds].unsqueeze(1)
        if step > max_steps:
            break
        step += 1
    i = complete_seqs_scores.index(max(complete_seqs_scores))
    return complete_seqs[i], float(complete_seqs_scores[i])


def tutorial_words(seq, word_map) -> list[str]:
    """caption.py's words: without <start>, <end> and <pad>."""
    rev = {i: w for w, i in word_map.items()}
    return [rev[i] for i in seq if i not in {word_map["<start>"], word_map["<end>"], word_map["<pad>"]}]


# ---------------------------------------------------------------------------------- a tutorial checkpoint
WORDS = ["a", "dog", "runs", "on", "grass", "the", "man", "rides", "bike", "two", "kids", "play", "in", "water",
         "red", "ball", "black", "cat", "sits", "street", "white", "snow", "girl", "jumps"]
ENCODED_SIZE, DIMS = 4, {"attention_dim": 16, "embed_dim": 16, "decoder_dim": 24}


def as_if_trained(decoder, end_id: int) -> None:
    """Make a random decoder (the tutorial's or ours: the same names) caption like a trained one, words varying
    with the image and <end> after several words: peaked output rows, a larger image input, and a clock in the
    LSTM (unit 0's cell state grows ~0.1 a step whatever the input; the <end> logit follows it)."""
    d, cell = decoder.init_h.out_features, decoder.decode_step
    with torch.no_grad():
        decoder.fc.weight.mul_(10)
        decoder.init_h.weight.mul_(3)
        for w in (cell.weight_ih, cell.weight_hh):
            w[0::d].zero_()  # unit 0 of the input, forget, cell and output gates: no input
        cell.bias_hh[0::d] = 0.0
        cell.bias_ih[0::d] = torch.tensor([torch.logit(torch.tensor(0.1)).item(), 10.0, 10.0, 10.0])
        decoder.init_c.weight[0].zero_()
        decoder.init_c.bias[0] = 0.0
        decoder.fc.weight[:, 0] = 0.0
        decoder.fc.weight[end_id, 0] = 20.0
        decoder.fc.bias[end_id] = -10.0


@pytest.fixture(scope="module")
def tutorial_models():
    """The tutorial's ``models`` module, importable as ``models`` while the checkpoint is written."""
    module = types.ModuleType("models")
    exec(compile(TUTORIAL_MODELS, "models.py", "exec"), module.__dict__)
    saved = sys.modules.get("models")
    sys.modules["models"] = module
    yield module
    if saved is None:
        del sys.modules["models"]
    else:
        sys.modules["models"] = saved


@pytest.fixture(scope="module")
def tutorial_run(tutorial_models, tmp_path_factory):
    """(checkpoint path, word map path, encoder, decoder, word_map): a small "trained" tutorial model.

    The word map is the tutorial's layout: words 1..n, <unk> n+1, <start> n+2, <end> n+3, <pad> 0.
    """
    torch.manual_seed(0)
    word_map = {w: i + 1 for i, w in enumerate(WORDS)}
    n = len(word_map)
    word_map.update({"<unk>": n + 1, "<start>": n + 2, "<end>": n + 3, "<pad>": 0})
    encoder = tutorial_models.Encoder(ENCODED_SIZE, backbone="resnet18")
    decoder = tutorial_models.DecoderWithAttention(vocab_size=len(word_map), encoder_dim=512, dropout=0.3, **DIMS)
    as_if_trained(decoder, word_map["<end>"])
    decoder_optimizer = torch.optim.Adam(params=filter(lambda p: p.requires_grad, decoder.parameters()), lr=4e-4)
    loss = decoder.fc(torch.randn(2, DIMS["decoder_dim"])).logsumexp(1).sum()  # one step: the optimizer has state
    loss.backward()
    decoder_optimizer.step()
    root = tmp_path_factory.mktemp("tutorial")
    ckpt = root / "BEST_checkpoint_flickr8k_5_cap_per_img_5_min_word_freq.pth.tar"
    torch.save({"epoch": 7, "epochs_since_improvement": 0, "bleu-4": 0.21, "encoder": encoder, "decoder": decoder,
                "encoder_optimizer": None, "decoder_optimizer": decoder_optimizer}, ckpt)
    wm = root / "WORDMAP_flickr8k_5_cap_per_img_5_min_word_freq.json"
    wm.write_text(json.dumps(word_map))
    return ckpt, wm, encoder.eval(), decoder.eval(), word_map


@pytest.fixture(scope="module")
def imported(tutorial_run, tmp_path_factory):
    ckpt, wm = tutorial_run[:2]
    saved = sys.modules.pop("models")  # reading the checkpoint must not need (or run) the tutorial's code
    try:
        out = tmp_path_factory.mktemp("imported") / "tutorial.pt"
        import_tutorial(ckpt, wm, out)
    finally:
        sys.modules["models"] = saved
    return out


@pytest.fixture(scope="module")
def held_out_images():
    torch.manual_seed(5)
    return torch.randn(6, 3, 256, 256) + 2 * torch.randn(6, 3, 1, 1)  # images that differ in colour, too


def test_import_recovers_config_vocabulary_and_decode_settings(imported, tutorial_run):
    word_map = tutorial_run[4]
    state = load_checkpoint(imported)  # our loader: weights_only=True
    model, vocab = model_from_checkpoint(state, imported)
    cfg = model.cfg
    assert (cfg.backbone, cfg.encoded_size, cfg.image_size) == ("resnet18", ENCODED_SIZE, 256)
    assert (cfg.attention_dim, cfg.embed_dim, cfg.decoder_dim, cfg.dropout) == (16, 16, 24, pytest.approx(0.3))
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", *WORDS]  # the word map's order, our specials
    assert state["decode"] == {"max_len": TUTORIAL_MAX_LEN} and TUTORIAL_MAX_LEN == 51
    assert state["imported_from"]["epoch"] == 7 and state["imported_from"]["bleu4"] == pytest.approx(0.21)
    # The rows moved with their words: our logits are the tutorial's, reordered.
    decoder = tutorial_run[3]
    h = torch.randn(3, DIMS["decoder_dim"])
    theirs = decoder.fc(h)
    ours = model.decoder.fc(h)
    for word in ["<start>", "<end>", "<unk>", "<pad>", "dog", "jumps"]:
        assert torch.equal(ours[:, vocab.stoi[word]], theirs[:, word_map[word]]), word
        assert torch.equal(model.decoder.embedding.weight[vocab.stoi[word]], decoder.embedding.weight[word_map[word]])


@pytest.fixture(scope="module")
def encoded_both_ways(imported, tutorial_run, held_out_images):
    """The tutorial encoder's output per image, and ours for the batch (the CNN runs once per module)."""
    encoder = tutorial_run[2]
    model, vocab = model_from_checkpoint(imported)
    with torch.no_grad():
        theirs = [encoder(image[None]) for image in held_out_images]  # (1, S, S, C) each
        return theirs, model.encode(held_out_images), model, vocab


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_tutorial_search_reproduces_the_tutorial_captions(encoded_both_ways, tutorial_run, held_out_images,
                                                          beam_size):
    _, _, _, decoder, word_map = tutorial_run
    theirs, encoded, model, vocab = encoded_both_ways
    ours = beam_search(encoded, model.step, beam_size, TUTORIAL_MAX_LEN, vocab.start_id, vocab.end_id,
                       search="tutorial")
    for image, features, hyp in zip(held_out_images, theirs, ours):
        seq, score = caption_image_beam_search(lambda _: features, decoder, image, word_map, beam_size)
        assert vocab.decode_tokens(hyp.tokens) == tutorial_words(seq, word_map)
        assert hyp.score == pytest.approx(score, abs=1e-4)
    assert len({tuple(h.tokens) for h in ours}) > 1, "the images should get different captions"


@pytest.mark.slow
def test_round_trip_import_export_runtimes_equal_the_tutorial(imported, tutorial_run, held_out_images, tmp_path):
    """tutorial checkpoint -> import -> export/to_onnx.py -> ORT == TorchScript == eager == the tutorial's search.

    The export is given no --max-decode-len: the manifest takes the imported checkpoint's (51)."""
    from export import to_onnx
    from export.runtime import Captioner, load_backend

    _, _, encoder, decoder, word_map = tutorial_run
    _, vocab = model_from_checkpoint(imported)
    assert to_onnx.main(["--checkpoint", str(imported), "--out", str(tmp_path / "exported"), "--torchscript",
                         "--calib-images", "2", "-q"]) == 0
    backends = {"eager": load_backend("eager", imported), "ort": load_backend("ort", tmp_path / "exported"),
                "torchscript": load_backend("torchscript", tmp_path / "exported")}
    for beam_size in (1, 3, 5):
        expected = [tutorial_words(caption_image_beam_search(encoder, decoder, image, word_map, beam_size)[0],
                                   word_map) for image in held_out_images]
        for name, backend in backends.items():
            captioner = Captioner(backend, beam_size=beam_size, search="tutorial")
            assert captioner.max_len == TUTORIAL_MAX_LEN  # recorded by the import, and by the export
            got = [vocab.decode_tokens(h.tokens) for h in captioner.caption_tensors(held_out_images)]
            assert got == expected, f"{name}, beam {beam_size}"


# ------------------------------------------------------------------------------------------------ refusals
class _Payload:
    """Unpickling this runs ``cmd``: what a hostile checkpoint does to plain torch.load / pickle.load."""

    def __init__(self, func, cmd):
        self.func, self.cmd = func, cmd

    def __reduce__(self):
        return self.func, (self.cmd,)


@pytest.mark.parametrize("where", ["top level", "inside the decoder"])
@pytest.mark.parametrize("func", ["os.system", "builtins.exec"])
def test_a_checkpoint_with_a_pickled_payload_is_refused_and_nothing_runs(tutorial_run, tmp_path, capsys, where,
                                                                         func):
    ckpt, wm, encoder, decoder, _ = tutorial_run
    marker = tmp_path / "pwned"
    payload = (_Payload(os.system, f"touch {marker}") if func == "os.system"
               else _Payload(exec, f"open({str(marker)!r}, 'w').close()"))
    evil = tmp_path / "BEST_checkpoint_evil.pth.tar"
    state = {"epoch": 1, "encoder": encoder, "decoder": decoder}
    if where == "top level":
        state["note"] = payload
    else:
        decoder.__dict__["hook"] = payload
    try:
        torch.save(state, evil)
    finally:
        decoder.__dict__.pop("hook", None)
    with pytest.raises(TutorialImportError, match="refusing to import .*evil.*nothing in it was run"):
        import_tutorial(evil, wm, tmp_path / "out.pt")
    assert main([str(evil), str(wm), "--out", str(tmp_path / "out.pt")]) == 2  # exit 2: a bad input file, one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: refusing to import {evil}"), err
    assert func.split(".")[1] in err  # names what it refused
    assert not marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "out.pt").exists()


def test_not_a_tutorial_checkpoint_or_word_map_is_named(tutorial_run, imported, tmp_path):
    ckpt, wm, *_ = tutorial_run
    with pytest.raises(TutorialImportError, match="not a tutorial checkpoint.*expected a dict with 'encoder'"):
        import_tutorial(imported, wm, tmp_path / "x.pt")  # one of ours
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TutorialImportError, match=f"refusing to import {junk}: it is not a pickle of a tutorial"):
        import_tutorial(junk, wm, tmp_path / "x.pt")
    other = tmp_path / "WORDMAP_other.json"
    other.write_text(json.dumps({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4}))
    with pytest.raises(TutorialImportError, match=f"{other}: the word map's ids are not 0..{len(WORDS) + 3}"):
        import_tutorial(ckpt, other, tmp_path / "x.pt")
    with pytest.raises(TutorialImportError, match="word map not found"):
        import_tutorial(ckpt, tmp_path / "missing.json", tmp_path / "x.pt")


def test_command_line(tutorial_run, tmp_path, capsys):
    ckpt, wm, *_ = tutorial_run
    out = tmp_path / "model.pt"
    assert main([str(ckpt), str(wm), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet18" in printed and "--search tutorial" in printed
    model, vocab = model_from_checkpoint(out)
    assert len(vocab) == len(WORDS) + 4


# -------------------------------------------------------------------------------------- default vs tutorial
@pytest.mark.parametrize("beam_size", [3, 5])
def test_default_search_scores_at_least_the_tutorial_search(beam_size):
    """Same scoring (raw sums): the default search's caption scores >= tutorial mode's on average and on >= 95%."""
    from core.model import CaptionModel, ModelConfig

    torch.manual_seed(beam_size)
    cfg = ModelConfig(vocab_size=40, backbone="resnet18", encoded_size=3, attention_dim=16, embed_dim=16,
                      decoder_dim=32)
    model = CaptionModel(cfg).eval()
    as_if_trained(model.decoder, Vocabulary.end_id)
    with torch.no_grad():
        encoded = model.decoder.encode_features(torch.randn(200, cfg.num_pixels, cfg.encoder_dim).relu())
    args = (encoded, model.step, beam_size, 30, Vocabulary.start_id, Vocabulary.end_id)
    ours = torch.tensor([h.score for h in beam_search(*args)])
    theirs = torch.tensor([h.score for h in beam_search(*args, search="tutorial")])
    not_lower = (ours >= theirs - 1e-5).float().mean()
    assert not_lower >= 0.95 and ours.mean() >= theirs.mean(), (float(not_lower), ours.mean(), theirs.mean())


@pytest.mark.parametrize("beam_size", [2, 3])
def test_default_search_finds_better_captions_where_the_tutorial_search_shrinks(beam_size):
    """Random bigram language models (the next word depends on the last one), where captions end at any step:
    the tutorial's shrinking beam misses some better captions that the default search's k live beams reach."""
    g = torch.Generator().manual_seed(beam_size)
    ours, theirs = [], []
    for _ in range(150):
        probs = torch._sample_dirichlet(torch.full((8, 8), 0.3), generator=g)  # (V, V) next-word distributions
        probs[:, :2] = 1e-9  # no <pad>, no <start>
        logprobs = (probs / probs.sum(1, keepdim=True)).log()

        def step(words, h, c, enc_out, enc_att):
            return logprobs[words], h, c, torch.ones(len(words), 1)

        encoded = Encoded(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
        ours.append(beam_search(encoded, step, beam_size, 12, 1, 2)[0].score)
        theirs.append(beam_search(encoded, step, beam_size, 12, 1, 2, search="tutorial")[0].score)
    ours, theirs = torch.tensor(ours), torch.tensor(theirs)
    assert (ours >= theirs - 1e-6).float().mean() >= 0.95 and ours.mean() > theirs.mean()
    assert (ours > theirs + 1e-6).any()


def test_caption_command_with_the_tutorial_search(imported, tutorial_run, tmp_path, capsys):
    """python -m export.caption --backend eager --search tutorial: the tutorial's captions of image files."""
    import numpy as np
    from PIL import Image

    from export.runtime.caption import main as caption_main
    from core.images import image_transform, load_image

    _, _, encoder, decoder, word_map = tutorial_run
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) // (i + 1)).save(paths[-1])
    assert caption_main([*map(str, paths), "--model", str(imported), "--backend", "eager", "--search", "tutorial",
                         "--beam-size", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "beam 3 (tutorial search), max_len 51" in err
    got = [json.loads(line)["caption"] for line in out.splitlines()]
    tf = image_transform(256, train=False)
    expected = [" ".join(tutorial_words(caption_image_beam_search(encoder, decoder, tf(load_image(p)), word_map, 3)[0],
                                        word_map)) for p in paths]
    assert got == expected


@pytest.mark.slow
def test_training_fine_tunes_an_imported_checkpoint(imported, run_train, tmp_path):
    """--init-from takes the imported weights: a mismatched setup names the flags, the right one trains."""
    out = tmp_path / "run"
    wrong = run_train(out, "--init-from", str(imported), "--max-steps", "1", "--no-final-eval")
    assert wrong.returncode == 1 and "--init-from" in wrong.stderr and "--image-size 256" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    flags = ["--backbone", "resnet18", "--encoded-size", str(ENCODED_SIZE), "--image-size", "256",
             *[f"--{k.replace('_', '-')}={v}" for k, v in DIMS.items()]]
    ok = run_train(out, "--init-from", str(imported), *flags, "--max-steps", "2", "--no-final-eval",
                   "--val-max-images", "2", "--batch-size", "2", "--resume", "none")
    assert ok.returncode == 0, ok.stderr
    assert "initialized from" in ok.stdout and "mapped by word" in ok.stdout
    trained = load_checkpoint(out / "last.pt")
    before = load_checkpoint(imported)["model"]
    # The encoder counts as pretrained: frozen (no --fine-tune-encoder), so it is the imported one, bit for bit.
    enc = [k for k in before if k.startswith("encoder.") and before[k].is_floating_point()]
    assert enc and all(torch.equal(trained["model"][k], before[k]) for k in enc if "running" not in k)
