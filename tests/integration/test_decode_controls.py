"""The decoding controls of core.decode on every backend (eager, TorchScript, ONNX Runtime), through the same
encode/step contract: seeded sampling (greedy, sample, top-k, top-p), diverse beam search, trigram blocking, bad
endings as a constraint inside the search; off, they leave the default and tutorial searches as they were. Then the
caption command's flags and the server's query parameters (with their limits) on the tiny trained export."""

from __future__ import annotations

import contextlib
import io
import json

import httpx
import pytest
from tests.support.export_artifacts import artifacts
from tests.support.server import Server

from core.decode import DecodeControls, beam_search, decode, sample
from export.runtime import EagerBackend, OrtBackend, TorchScriptBackend, caption

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ("eager", "torchscript", "ort")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def backends(art):
    return {"ort": OrtBackend(art.export_dir, providers=["cpu"], threads=1),
            "torchscript": TorchScriptBackend(art.export_dir, device="cpu"),
            "eager": EagerBackend.from_checkpoint(art.checkpoint, device="cpu")}


@pytest.fixture(scope="module")
def encodings(art, backends):
    return {name: b.encode(art.images) for name, b in backends.items()}


def run(backends, encodings, name, beam=3, max_len=20, **controls):
    b = backends[name]
    return decode(encodings[name], b.step, beam, max_len, b.vocab.start_id, b.vocab.end_id,
                  controls=DecodeControls(**controls))


def trigrams(tokens: list[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]


@pytest.mark.parametrize("name", BACKENDS)
def test_controls_off_keep_the_default_and_tutorial_searches(backends, encodings, name):
    b = backends[name]
    for search in ("default", "tutorial"):
        plain = beam_search(encodings[name], b.step, 3, 20, b.vocab.start_id, b.vocab.end_id, search=search)
        got = decode(encodings[name], b.step, 3, 20, b.vocab.start_id, b.vocab.end_id, search=search,
                     controls=DecodeControls())
        assert [[h.tokens] for h in plain] == [[h.tokens for h in hs] for hs in got]
        assert [h.score for h in plain] == [hs[0].score for hs in got]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("method,extra", [("sample", {}), ("top-k", {"top_k": 3}), ("top-p", {"top_p": 0.8})])
def test_seeded_sampling_is_reproducible_and_draws_n_per_image(backends, encodings, name, method, extra):
    kw = dict(sample_method=method, sample_n=4, temperature=1.5, **extra)
    first = run(backends, encodings, name, seed=7, **kw)
    again = run(backends, encodings, name, seed=7, **kw)
    other = run(backends, encodings, name, seed=8, **kw)
    tokens = [[h.tokens for h in hs] for hs in first]
    assert len(tokens) == 8 and all(len(t) == 4 for t in tokens)
    assert tokens == [[h.tokens for h in hs] for hs in again]
    assert tokens != [[h.tokens for h in hs] for hs in other]
    assert len({tuple(t) for ts in tokens for t in ts}) > 8  # not one caption per image: drawn, not searched


@pytest.mark.parametrize("name", BACKENDS)
def test_top_k_of_one_top_p_near_zero_and_a_cold_temperature_equal_greedy_search(backends, encodings, name):
    greedy = [hs[0].tokens for hs in run(backends, encodings, name, beam=1)]
    assert [hs[0].tokens for hs in run(backends, encodings, name, sample_method="top-k", top_k=1, seed=0)] == greedy
    assert [hs[0].tokens for hs in run(backends, encodings, name, sample_method="top-p", top_p=0.01, seed=0)] == greedy
    b = backends[name]  # the sampler's greedy rows (SCST's greedy baseline) are the beam search of size 1
    rows = sample(encodings[name], b.step, 2, 20, b.vocab.start_id, b.vocab.end_id, method="greedy")
    assert [r[: int(n)].tolist() for r, n in zip(rows.tokens, rows.lengths)] == [t for t in greedy for _ in range(2)]

    def agree(temperature: float) -> int:  # rows of 4 samples x 8 images equal to the image's greedy caption
        out = run(backends, encodings, name, sample_method="sample", temperature=temperature, sample_n=4, seed=0)
        return sum(h.tokens == g for hs, g in zip(out, greedy) for h in hs)

    cold, hot = agree(0.001), agree(2.0)
    assert cold >= 28 and hot < cold  # T -> 0 draws the argmax (but for near ties); a high T spreads the draws


@pytest.mark.parametrize("name", BACKENDS)
def test_diverse_beam_search_returns_one_distinct_caption_per_group(backends, encodings, name):
    out = run(backends, encodings, name, beam=6, beam_groups=3, diversity=5.0)
    for hyps in out:
        assert len(hyps) == 3 and len({tuple(h.tokens) for h in hyps}) == 3
    plain = run(backends, encodings, name, beam=2)  # group 1 is a plain search of its 2 beams
    assert [hs[0].tokens for hs in out] == [hs[0].tokens for hs in plain]


@pytest.mark.parametrize("name", BACKENDS)
def test_trigram_blocking_never_repeats_a_trigram(backends, encodings, name):
    never_end = tuple(range(len(backends[name].vocab)))  # no word may end a caption: 30 words, bound to repeat
    for kw in ({}, dict(sample_method="sample", sample_n=3, seed=3)):
        free = [h.tokens for hs in run(backends, encodings, name, max_len=30, bad_ending_ids=never_end, **kw)
                for h in hs]
        assert any(len(set(trigrams(t))) < len(trigrams(t)) for t in free)  # without blocking, repeats happen
        blocked = [h.tokens for hs in run(backends, encodings, name, max_len=30, bad_ending_ids=never_end,
                                          block_trigrams=True, **kw) for h in hs]
        assert all(len(set(trigrams(t))) == len(trigrams(t)) for t in blocked)
        assert all(len(t) == 30 for t in blocked)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_endings_are_a_constraint_inside_the_search(backends, encodings, name):
    plain = [hs[0] for hs in run(backends, encodings, name)]
    bad = (plain[0].tokens[-1],)  # the word the free search ends image 0's caption on
    for kw in ({}, dict(sample_method="sample", sample_n=3, seed=1)):
        out = [h for hs in run(backends, encodings, name, bad_ending_ids=bad, **kw) for h in hs]
        assert all(len(h.tokens) == 20 or h.tokens[-1] not in bad for h in out)  # (20 words: cut, not ended)
    # not a post-filter: the search went on past the forbidden ending to another caption that ends
    first = run(backends, encodings, name, bad_ending_ids=bad)[0][0]
    assert first.tokens != plain[0].tokens and 0 < len(first.tokens) < 20, backends[name].vocab.decode(first.tokens)


def test_the_caption_command_prints_every_sampled_caption(art):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "--threads", "1", "-q", "--json",
                           "--sample-method", "top-k", "--top-k", "3", "--sample-n", "3", "--seed", "1",
                           "--block-trigrams", "--bad-endings"])
    assert rc == 0
    (row,) = map(json.loads, out.getvalue().splitlines())
    assert len(row["captions"]) == 3 and row["captions"][0]["caption"] == row["caption"]
    assert all(c["caption"].split()[-1] not in ("a", "the", "of") for c in row["captions"] if c["caption"])


@pytest.mark.parametrize("flags,says", [(["--temperature", "0"], "temperature must be > 0"),
                                         (["--sample-method", "top-p", "--top-p", "1.5"], "0 < top_p <= 1"),
                                         (["--sample-n", "3"], "choose a sample_method other than greedy"),
                                         (["--beam-size", "3", "--beam-groups", "2"], "multiple of --beam-groups")])
def test_the_caption_command_refuses_bad_controls_in_one_line(art, capsys, flags, says):
    rc = caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "-q", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and says in err


def test_the_server_refuses_bad_controls_in_one_line_before_loading_the_model(art, capsys):
    from export.serve import server

    rc = server.main(["--model", str(art.export_dir), "--port", "0", "--sample-n", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: decoding controls:") and "cannot load the model" not in err


def test_the_server_takes_decoding_controls_as_query_parameters_within_limits(art):
    srv = Server(art.export_dir, "--beam-size", "4")
    try:
        files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in art.image_paths[:2]]
        url = f"{srv.url}/v1/captions"

        def post(params):
            return httpx.post(url, files=files, params=params, timeout=60)

        sampled = {"sample_method": "sample", "sample_n": 3, "seed": 5, "block_trigrams": "true", "bad_endings": ""}
        r = post(sampled)
        assert r.status_code == 200, r.text
        assert [len(x["captions"]) for x in r.json()["results"]] == [3, 3]
        assert post(sampled).json() == r.json()  # seeded: the same captions again
        alone = httpx.post(url, files=files[1:], params={**sampled, "seed": 6}, timeout=60).json()["results"][0]
        assert alone["captions"] == r.json()["results"][1]["captions"]  # image i of a request: seed + i
        r = post({"beam_groups": 2, "diversity": 3})
        assert r.status_code == 200 and all(len({c["caption"] for c in x["captions"]}) == 2
                                            for x in r.json()["results"])
        for params, says in [({"sample_n": 11}, "between 1 and 10"), ({"temperature": "hot"}, "a number"),
                             ({"beam_groups": 3}, "divide the server's beam size 4"),
                             ({"sample_method": "nucleus"}, "sample_method must be one of")]:
            r = post(params)
            assert r.status_code == 400 and says in r.json()["error"], (params, r.text)
        assert "captions" not in post({}).json()["results"][0]  # no controls: the server's beam search
    finally:
        assert srv.terminate() == 0, srv.log
