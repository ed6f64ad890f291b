"""Training throughput benchmarks (pytest-benchmark).

    .venv/bin/pytest bench/test_bench_train.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Groups:
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

import pytest
import torch

from core.data import load_dataset
from core.model import CaptionModel, ModelConfig, caption_loss
from distributed.env import DistEnv
from distributed.loaders import dali_available, make_train_loader

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
            logits, alphas = model(images, captions, lengths)
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
