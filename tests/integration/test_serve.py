"""python -m export.serve: a real uvicorn server on 127.0.0.1 (ephemeral port) driven over HTTP with httpx.

Captions equal export.caption's for the same images and beam; concurrent requests share one batched beam search
(read from /metrics); every class of bad input gets its status and the server answers the next good request;
a full queue answers 503 + Retry-After and a slow answer 504; SIGTERM lets the request in flight finish.
The model is the tiny trained export of tests/support/export_artifacts.py (built once per test process).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from PIL import Image
from tests.support.export_artifacts import artifacts
from tests.support.server import Server, encode, metric, png_bomb

from export.runtime import caption
from export.serve.batcher import BatcherConfig, DynamicBatcher
from export.serve.metrics import parse_histogram

BEAM = "3"
LIMIT_MB = 0.25  # --max-body-mb of the main server
MAX_PIXELS = 200_000


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(art) -> dict[str, dict]:
    """{path: {"caption", "score"}} from the caption command (in process: the same main() as python -m)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = caption.main([*map(str, art.image_paths), "--model", str(art.export_dir), "--beam-size", BEAM,
                           "--json", "--threads", "1", "-q"])
    assert rc == 0
    return {r["file"]: r for r in map(json.loads, out.getvalue().splitlines())}


@pytest.fixture(scope="module")
def server(art):
    # a long --max-wait-ms: requests sent together surely meet in one batch
    srv = Server(art.export_dir, "--beam-size", BEAM, "--max-batch", "8", "--max-wait-ms", "300",
                 "--max-body-mb", str(LIMIT_MB), "--max-images", "8", "--max-pixels", str(MAX_PIXELS))
    yield srv
    assert srv.terminate() == 0, srv.log


def post(url: str, *paths, attention: bool = False, client=httpx) -> httpx.Response:
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post(f"{url}/v1/captions", files=files, params={"attention": 1} if attention else None, timeout=60)


def test_captions_equal_the_caption_command(server, art, expected):
    paths = art.image_paths
    many = post(server.url, *paths)  # one request, several images, in field order
    assert many.status_code == 200, many.text
    raw = httpx.post(f"{server.url}/v1/captions", content=paths[0].read_bytes(),
                     headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 200, raw.text
    results = many.json()["results"] + raw.json()["results"]
    for path, got in zip([*paths, paths[0]], results):
        want = expected[str(path)]
        assert got["caption"] == want["caption"], path
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert " ".join(got["tokens"]) == got["caption"] and len(got["token_ids"]) == len(got["tokens"])
        assert "attention" not in got


def test_attention_grids_per_word(server, art):
    r = post(server.url, art.image_paths[1], attention=True)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    side = r.json()["results"][0]["attention"]["grid"]
    maps = res["attention"]["maps"]
    assert side == [2, 2] and len(maps) == len(res["tokens"]) > 0  # the tiny model: 2x2 regions
    for m in maps:
        assert len(m) == 4 and sum(m) == pytest.approx(1.0, abs=1e-3)  # a softmax over the regions


def test_health_model_page_and_metrics(server, art):
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    info = httpx.get(f"{server.url}/v1/model").json()
    manifest = json.loads((art.export_dir / "manifest.json").read_text())
    assert info["dims"] == manifest["dims"] and info["vocab_size"] == manifest["dims"]["vocab_size"]
    assert info["backend"] == "ort" and info["providers"] == ["CPUExecutionProvider"] and info["precision"] == "fp32"
    assert info["decode"]["beam_size"] == int(BEAM)
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<canvas" in page.text and "v1/captions" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for external in ("http://", "https://", "//cdn", "<link", "src=\""):  # self-contained: nothing fetched
        assert external not in page.text, external
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'sat_requests_total{status="200"}' in metrics and "sat_queue_depth" in metrics
    assert "sat_request_latency_seconds_bucket" in metrics and "sat_batch_size_bucket" in metrics


def test_concurrent_requests_share_one_batch_and_get_their_own_results(server, art, expected):
    paths = art.image_paths[:6]
    before = parse_histogram(httpx.get(f"{server.url}/metrics").text, "sat_batch_size")

    async def all_at_once():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(post(server.url, p, client=client) for p in paths))

    responses = asyncio.run(all_at_once())
    after = parse_histogram(httpx.get(f"{server.url}/metrics").text, "sat_batch_size")
    assert [r.status_code for r in responses] == [200] * len(paths)
    for p, r in zip(paths, responses):  # each request its own image's caption, whatever the batch order
        assert r.json()["results"][0]["caption"] == expected[str(p)]["caption"]
    batches, images = after[0] - before[0], after[1] - before[1]
    assert images == len(paths)
    # one batch when all six arrive within --max-wait-ms; a loaded machine may split them, never into singles
    assert batches <= 3, f"{len(paths)} concurrent requests ran as {batches:g} batches"


BAD = {  # name: (body kwargs, status, words the error must contain)
    "too-large": (dict(content=b"\xff" * int(LIMIT_MB * 2**20 + 1), headers={"Content-Type": "image/jpeg"}),
                  413, "over the limit"),
    "too-many-images": (dict(files=[("image", ("a.png", b"x", "image/png"))] * 9), 413, "more than 8 images"),
    "text-body": (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain"),
    "json-part": (dict(files={"image": ("a.json", b"{}", "application/json")}), 415, "application/json"),
    "gif": (dict(files={"image": ("a.gif", encode(Image.new("RGB", (8, 8)), "GIF"), "image/gif")}), 415, "GIF"),
    "path-as-text": (dict(files={"image": (None, b"/etc/passwd")}), 415, "file upload"),  # a form field, no file
    "no-image-field": (dict(files={"photo": ("a.png", b"x", "image/png")}), 422, "no 'image' field"),
    "not-an-image": (dict(files={"image": ("a.jpg", b"not an image at all", "image/jpeg")}), 422, "not-an-image"),
    "truncated": (dict(files={"image": ("t.jpg", encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300],
                                        "image/jpeg")}), 422, "truncated"),
    "bomb": (dict(files={"image": ("bomb.png", png_bomb(), "image/png")}), 422, "decompression-bomb"),
    "pixel-limit": (dict(files={"image": ("big.png", encode(Image.new("RGB", (600, 400)), "PNG"), "image/png")}),
                    422, f"over the limit of {MAX_PIXELS}"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_its_status_and_the_next_request_is_served(server, art, expected, name):
    kwargs, status, words = BAD[name]
    r = httpx.post(f"{server.url}/v1/captions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    good = post(server.url, art.image_paths[2])
    assert good.status_code == 200 and good.json()["results"][0]["caption"] == expected[str(art.image_paths[2])][
        "caption"]


def test_full_queue_is_503_with_retry_after_and_a_slow_answer_is_504(art):
    # queue of 2 images; a lone image waits up to 2 s for company, longer than its 0.5 s timeout
    srv = Server(art.export_dir, "--queue-size", "2", "--max-batch", "4", "--max-wait-ms", "2000",
                 "--timeout-s", "0.5", "--beam-size", "1")
    try:
        full = post(srv.url, *art.image_paths[:3])  # 3 images never fit in a queue of 2
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1, full.text
        slow = post(srv.url, art.image_paths[0])
        assert slow.status_code == 504 and "--timeout-s" in slow.json()["error"]
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    finally:
        assert srv.terminate() == 0, srv.log


def test_sigterm_lets_the_request_in_flight_finish(art, expected):
    srv = Server(art.export_dir, "--max-batch", "8", "--max-wait-ms", "1500", "--beam-size", BEAM)
    result = {}
    sender = threading.Thread(target=lambda: result.update(r=post(srv.url, art.image_paths[3])))
    sender.start()
    deadline = time.monotonic() + 30
    while metric(srv.url, "sat_requests_in_flight") < 2:  # it + this one
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.05)
    code = srv.terminate()  # sent while the request waits for company in the batcher
    sender.join(timeout=60)
    assert code == 0, srv.log
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["results"][0]["caption"] == expected[str(art.image_paths[3])]["caption"]
    with pytest.raises(httpx.ConnectError):  # and it took no new connections after
        httpx.get(f"{srv.url}/healthz")


def test_batcher_gathers_up_to_max_batch_in_order_and_drains_on_stop():
    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        time.sleep(0.05)
        return [x * 10 for x in items]

    async def scenario():
        b = DynamicBatcher(run, BatcherConfig(max_batch=4, max_wait_ms=200, queue_size=64))
        await b.start()
        tasks = [asyncio.create_task(b.submit(i, timeout_s=10)) for i in range(10)]
        await asyncio.sleep(0)
        await b.stop()  # everything submitted before stop still runs
        return [await t for t in tasks]

    assert asyncio.run(scenario()) == [i * 10 for i in range(10)]
    assert seen == [4, 4, 2]
