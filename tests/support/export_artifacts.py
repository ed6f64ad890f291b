"""Shared set-up for the export, runtime and caption tests (no tests here).

One tiny model (resnet18 at 64 px, 2x2 regions, dims 32) is trained for a few seconds on a synthetic
Flickr8k-layout dataset so its captions are real sentences rather than random-weight noise, saved as a
checkpoint, and exported ONCE per test session by running ``python export/to_onnx.py`` as a subprocess (which
also tests the script's own entry point). Test modules reach it through :func:`artifacts`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CFG = dict(backbone="resnet18", encoded_size=2, image_size=64, attention_dim=32, embed_dim=32, decoder_dim=32,
           dropout=0.0)
NUM_IMAGES = 40


@dataclass
class Artifacts:
    root: Path
    data_dir: Path
    checkpoint: Path
    export_dir: Path
    export_log: str
    export_seconds: float
    images: torch.Tensor  # (8, 3, 64, 64) preprocessed val + test images
    image_paths: list[Path]


_CACHE: dict[str, Artifacts] = {}


def _calibrate_and_train(data_dir: Path, steps: int = 60):
    from bench.suite import calibrate_batchnorm
    from core.checkpoint import make_checkpoint
    from core.data import load_dataset
    from core.images import image_transform, load_image
    from core.model import CaptionModel, ModelConfig, caption_loss

    data = load_dataset(data_dir)  # the default split, as the CLIs use it: 32 train, 4 val, 4 test
    vocab = data.build_vocab()
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), **CFG))
    tf = image_transform(CFG["image_size"], train=False)
    names = data.splits["train"]
    images = torch.stack([tf(load_image(data.image_path(n))) for n in names])
    # Random-weight BatchNorm statistics blow activations up to ~1e5; measure them on real images instead
    # (cumulative average), so features have a sane scale, like a pretrained encoder's.
    calibrate_batchnorm(model.encoder, images)
    with torch.no_grad():
        feats = model.encoder(images)
    table = data.caption_table("train", vocab, max_len=16)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    model.decoder.train()
    idx = torch.arange(len(names))
    for step in range(steps):
        caps, lens = table.sample(idx, epoch=step, seed=0)
        logits, alphas = model.decoder(feats, caps, lens)
        loss = caption_loss(logits, caps, lens, alphas, alpha_c=0.0)  # CE only: quickest to real words
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return make_checkpoint(model, vocab, epoch=1, loss=float(loss.detach())), data


def artifacts(tmp_path_factory) -> Artifacts:
    """Build (once per process) the dataset, trained checkpoint and export directory."""
    if "a" in _CACHE:
        return _CACHE["a"]
    from core.checkpoint import save_checkpoint
    from core.images import image_transform, load_image
    from core.synthetic import generate

    torch.set_num_threads(1)  # spinning OpenMP threads on shared cores cost 5x in wall time
    root = tmp_path_factory.mktemp("export_session")
    t0 = time.perf_counter()
    data_dir = generate(root / "data", NUM_IMAGES, seed=3, size=64)
    state, data = _calibrate_and_train(data_dir)
    print(f"\n[export tests] synthetic data + training: {time.perf_counter() - t0:.1f} s")
    ckpt = save_checkpoint(root / "run" / "best.pt", state)
    export_dir = root / "exported"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "export/to_onnx.py", "--checkpoint", str(ckpt), "--out", str(export_dir), "--quantize", "int8",
         "--calib-data", str(data_dir), "--split", "test", "--calib-images", "8", "--threads", "1", "--fp16",
         "--torchscript"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    seconds = time.perf_counter() - t0
    print(f"[export tests] export script: {seconds:.1f} s")
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    tf = image_transform(CFG["image_size"], train=False)
    paths = [data.image_path(n) for n in data.splits["val"] + data.splits["test"]]  # 8 held-out images
    images = torch.stack([tf(load_image(p)) for p in paths])
    _CACHE["a"] = Artifacts(root, data_dir, ckpt, export_dir, proc.stdout + proc.stderr, seconds, images, paths)
    return _CACHE["a"]


def copy_export(src: Path, dst: Path) -> Path:
    """A private copy of the export directory, for tests that damage files."""
    import shutil

    shutil.copytree(src, dst)
    return dst
