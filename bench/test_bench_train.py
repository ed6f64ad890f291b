"""Training throughput benchmarks (pytest-benchmark).

    .venv/bin/pytest bench/test_bench_train.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Groups:
  train vs tutorial (cpu)  captions/s of a training step at the inference rows' shapes (bench/config.py: ResNet-101
                   at 256 px, 512/512/512, vocabulary 2,600), batch of TRAIN_IMAGES images, frozen encoder: the
                   tutorial's own loop (bench/reference.py: one caption per sample, the encoder per caption, the
                   attention projection per step, fp32) against ours at fp32 and at the precision auto picks, with 1
                   and all 5 captions per encoder pass, from images and from the feature cache (built once before its
                   rows; the build's time is its own row's extra_info). extra_info: captions/s, the ratio to the
                   tutorial's, the FLOP floor of the step at the fp32 GEMM peak measured in the run (bench/floor.py)
  train-step-cpu   one optimizer step of the demo model (ResNet-18 at 128 px, 4x4 grid, batch 16), fp32 vs bf16
                   autocast (and bf16 with channels-last convolutions, the trainer's default), on one CPU thread (what
                   each of the demo's 2 processes gets); extra_info: samples/s. The bf16 rows are not run on a CPU
                   without native bf16 (bench/plan.py: emulated, about 30x slower)
  loader-cpu       one epoch over 256 synthetic 128-px images (train transform, batch 16, pipeline set-up included):
                   DALI CPU pipeline vs torch DataLoader, both with 1 thread / in-process loading; extra_info: images/s
  train-step-gpu, loader-gpu   the same on CUDA (bf16 / fp16; DALI "mixed" decode vs torch + pinned memory), marked gpu
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from bench.config import config_from_env
from bench.floor import encoder_macs, measure_peak, train_step_flops
from bench.reference import tutorial_train_step
from core import hardware
from core.data import load_dataset
from core.model import CaptionModel, ModelConfig, caption_loss
from distributed.config import TrainConfig
from distributed.env import DistEnv
from distributed.feature_cache import open_feature_cache
from distributed.loaders import dali_available, make_train_loader
from distributed.optim import build_optimizer, clip_gradients

BATCH = 16
IMAGES = 256
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    from core.synthetic import generate

    root = generate(tmp_path_factory.mktemp("bench") / "data", IMAGES, seed=0, size=128)
    data = load_dataset(root, val_frac=0.0, test_frac=0.0)
    return data, data.build_vocab(min_freq=1)


# ------------------------------------------------------------------------------------- training vs the tutorial
TRAIN_IMAGES = 32  # images per step: the tutorial's batch_size and the trainer's default --batch-size
TRAINERS = ["tutorial", "fp32-k1", "fp32-k5", "fp32-k1-cache", "fp32-k5-cache", "auto-k1", "auto-k5", "auto-k1-cache",
            "auto-k5-cache"]
_tutorial_rate: dict[str, float] = {}


@pytest.fixture(scope="module")
def train_bench(tmp_path_factory):
    """The model (bench.suite's random weights), images, captions of realistic lengths, a built feature cache."""
    from bench.suite import build_model
    from core.synthetic import generate

    cfg = config_from_env()
    torch.set_num_threads(cfg.num_threads)
    model = build_model(cfg)
    root = generate(tmp_path_factory.mktemp("train-bench") / "data", TRAIN_IMAGES, seed=0, size=cfg.model.image_size)
    data = load_dataset(root, val_frac=0.0, test_frac=0.0)
    names = data.splits["train"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(3, cfg.max_len // 2), cfg.max_len + 1, (TRAIN_IMAGES * 5,), generator=g)  # (5B,)
    captions = torch.randint(4, cfg.model.vocab_size, (TRAIN_IMAGES * 5, cfg.max_len), generator=g)
    captions[:, 0] = 1
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), True)
    t0 = time.perf_counter()
    cache = open_feature_cache(model, data, "train", str(tmp_path_factory.mktemp("cache")), "fp16", "fp32",
                               contextlib.nullcontext(), env, batch_size=TRAIN_IMAGES)
    build_s = time.perf_counter() - t0
    peak = measure_peak(cfg.num_threads, quick=cfg.quick)["fp32_GFLOPs"]
    return dict(cfg=cfg, model=model, images=data.eval_images(names, cfg.model.image_size), captions=captions,
                lengths=lengths, cache=cache, build_s=build_s, peak=peak, macs=encoder_macs(model))


def _ours(b: dict, amp: torch.dtype | None, k: int, cached: bool):
    """Our training step (the trainer's pieces: frozen encoder in eval mode, channels-last, fused Adam, clipping)."""
    model = b["model"]
    model.train()
    model.encoder.eval()
    model.encoder.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, TrainConfig())
    autocast = contextlib.nullcontext() if amp is None else torch.autocast("cpu", dtype=amp)
    rows = torch.arange(TRAIN_IMAGES)
    captions, lengths = b["captions"][: TRAIN_IMAGES * k], b["lengths"][: TRAIN_IMAGES * k]
    captions = captions[:, : int(lengths.max())]
    images = b["images"].contiguous(memory_format=torch.channels_last)

    def step():
        with autocast:
            if cached:
                logits, alphas = model.decoder(b["cache"].rows(rows), captions, lengths, packed=True)  # cache read
            else:
                logits, alphas = model(images, captions, lengths, packed=True)
            loss = caption_loss(logits, captions, lengths, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(opt, 5.0)
        opt.step()

    return step, lengths


def _tutorial(b: dict):
    model = b["model"]
    model.train()  # (the tutorial's encoder too: frozen weights, BatchNorm in train mode)
    opt = torch.optim.Adam([p for p in model.decoder.parameters() if p.requires_grad], lr=4e-4)
    captions, lengths = b["captions"][:TRAIN_IMAGES], b["lengths"][:TRAIN_IMAGES]

    def step():
        tutorial_train_step(model, opt, b["images"], captions, lengths)

    return step, lengths


@pytest.mark.benchmark(group="train vs tutorial (cpu)")
@pytest.mark.parametrize("trainer", TRAINERS)
def test_train_vs_tutorial(benchmark, train_bench, trainer):
    b = train_bench
    auto = hardware.choose_amp("auto", "cpu", hardware.detect()).value
    if trainer.startswith("auto") and auto is None:
        pytest.skip("precision auto is fp32 on this CPU (no native bf16): the fp32 rows are its rows")
    k = 5 if "-k5" in trainer else 1
    cached = trainer.endswith("cache")
    step, lengths = _tutorial(b) if trainer == "tutorial" else _ours(b, auto if trainer.startswith("auto") else None,
                                                                     k, cached)
    torch.manual_seed(0)
    cfg = b["cfg"]
    # Seconds per call from images (the tutorial's: tens of seconds on an AVX2-only CPU): one round after a warm-up.
    rounds = 1 if cfg.quick or not cached else 3
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0 if cfg.quick else 1)
    flops = train_step_flops(cfg.model, lengths, k, 0 if cached else b["macs"])
    info = {"kind": "train_tutorial", "backend": trainer, "captions_per_step": len(lengths),
            "train_floor_ms": flops["total"] / (b["peak"] * 1e9) * 1e3, "peak_GFLOPs": round(b["peak"], 1),
            "flops_per_caption": flops["total"] / len(lengths)}
    if cached:
        info["cache_build_s"] = round(b["build_s"], 2)
    if benchmark.stats is not None:
        rate = len(lengths) / benchmark.stats.stats.median
        info["captions_per_s"] = round(rate, 2)
        if trainer == "tutorial":
            _tutorial_rate["fp32"] = rate
        elif "fp32" in _tutorial_rate:
            info["vs_tutorial"] = round(rate / _tutorial_rate["fp32"], 2)
    benchmark.extra_info.update(info)
    b["model"].encoder.to(memory_format=torch.contiguous_format)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def _env(device: str) -> DistEnv:
    return DistEnv(0, 0, 1, 1, torch.device(device), True)


def _step_fn(device: str, amp: torch.dtype | None, channels_last: bool = False):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=45, backbone="resnet18", encoded_size=4, image_size=128, attention_dim=256,
                      embed_dim=256, decoder_dim=256)
    model = CaptionModel(cfg).to(device).train()
    for p in model.encoder.parameters():
        p.requires_grad = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp is torch.float16)
    images = torch.randn(BATCH, 3, 128, 128, device=device)
    if channels_last:
        model.encoder.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    captions = torch.randint(4, 45, (BATCH, 14), device=device)
    captions[:, 0] = 1
    lengths = torch.full((BATCH,), 14, device=device)
    autocast = contextlib.nullcontext() if amp is None else torch.autocast(device, dtype=amp)

    def step():
        with autocast:
            logits, alphas = model(images, captions, lengths, packed=True)
            loss = caption_loss(logits, captions, lengths, alphas)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (oneDNN / cuDNN kernel selection)
    return step


def _record_rate(benchmark, key: str, items: int) -> None:
    """items per second of the mean round; nothing under --benchmark-disable (no stats are kept)."""
    if benchmark.stats is not None:
        benchmark.extra_info[key] = round(items / benchmark.stats.stats.mean, 1)


def _run_step(benchmark, device, amp, rounds, channels_last=False):
    step = _step_fn(device, amp, channels_last)
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    _record_rate(benchmark, "samples_per_s", BATCH)


@pytest.mark.benchmark(group="train-step-cpu")
@pytest.mark.parametrize("amp,channels_last", [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-channels-last"])
def test_train_step_cpu(benchmark, threads, amp, channels_last):
    _run_step(benchmark, "cpu", amp, rounds=3, channels_last=channels_last)


@cuda
@pytest.mark.gpu
@pytest.mark.benchmark(group="train-step-gpu")
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_train_step_gpu(benchmark, amp):
    _run_step(benchmark, "cuda", amp, rounds=20, channels_last=True)


def _run_loader(benchmark, bench_data, kind, device, workers):
    data, vocab = bench_data
    table = data.caption_table("train", vocab)
    loader = make_train_loader(kind, data, table, 128, BATCH, _env(device), seed=0, workers=workers)
    epoch = iter(range(10**6))

    def one_pass():
        n = 0
        for batch in loader.epoch(next(epoch)):
            n += batch.images.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    assert one_pass() == IMAGES  # warm-up, and every image once
    benchmark.pedantic(one_pass, rounds=3, iterations=1)
    _record_rate(benchmark, "images_per_s", IMAGES)
    loader.close()


@pytest.mark.benchmark(group="loader-cpu")
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_loader_cpu(benchmark, bench_data, threads, kind):
    # The same thread count: DALI gets 1 pipeline thread, torch loads in the main process (0 workers).
    _run_loader(benchmark, bench_data, kind, "cpu", workers=0 if kind == "torch" else 1)


@cuda
@pytest.mark.gpu
@pytest.mark.benchmark(group="loader-gpu")
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_loader_gpu(benchmark, bench_data, kind):
    _run_loader(benchmark, bench_data, kind, "cuda", workers=4)
