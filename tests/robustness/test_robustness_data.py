"""Caption lines training must not use (duplicate ids, the same caption twice, captions with no words): flagged by
`python -m core.data check` and skipped by training by one rule, counted in the training log; a bad --data is
refused before --out is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.captions import TOKEN_FILE, parse_token_file
from core.datacheck import check_dataset
from core.synthetic import generate
from distributed.config import parse_config
from distributed.env import DistEnv
from distributed.loaders import load_data

REPO = Path(__file__).resolve().parents[2]
SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), is_main=True)


@pytest.fixture
def flawed(tmp_path) -> tuple[Path, dict[int, str]]:
    """A small dataset whose caption file ends with 5 lines to skip: {line number: kind}."""
    data = generate(tmp_path / "data", 10, seed=3, size=32)
    token = data / TOKEN_FILE
    lines = token.read_text(encoding="utf-8").splitlines()
    name, first = lines[0].split("#")[0], lines[0].split("\t")[1]
    other = lines[-1].split("#")[0]
    extra = [(f"{name}#0\ta different caption under an id already used", "duplicate-caption"),
             (f"{name}#9\t  {first.upper()}  ", "duplicate-caption"),  # same words, other case and spacing
             (f"{other}#7\t...", "empty-caption"),
             (f"{other}#8\t!!! ?? --", "empty-caption"),
             (f"{other}#9\t\u2026", "empty-caption")]  # an ellipsis character: no word either
    token.write_text("\n".join(lines + [text for text, _ in extra]) + "\n", encoding="utf-8")
    return data, {len(lines) + 1 + i: kind for i, (_, kind) in enumerate(extra)}


def test_the_check_flags_the_lines_training_skips(flawed):
    data, expected = flawed
    report = check_dataset(data, workers=1)
    flagged = {p.line: p.kind for p in report.problems if p.kind in ("duplicate-caption", "empty-caption")}
    assert flagged == expected
    assert "duplicate-caption 2" in report.summary() and "empty-caption 3" in report.summary()
    with pytest.warns(UserWarning, match=r"5 caption line\(s\) skipped: duplicate-caption 2 \(first on line \d+\), "
                                         r"empty-caption 3"):
        captions = parse_token_file(data / TOKEN_FILE)
    assert sum(len(c) for c in captions.values()) == 10 * 5  # the generator's 5 per image, nothing more
    assert not any(c.strip(".!?- \u2026") == "" for caps in captions.values() for c in caps)


def test_training_counts_the_skipped_lines_in_its_log(flawed, tmp_path, caplog):
    data, _ = flawed
    cfg = parse_config(["--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    loaded, vocab = load_data(cfg, SINGLE)
    assert "5 caption line(s) skipped" in caplog.text
    assert loaded.num_captions == 50 and "..." not in vocab.itos


@pytest.mark.parametrize("breakage", ["no_tab", pytest.param("missing_data_dir", marks=pytest.mark.slow)])
def test_bad_data_is_refused_before_the_run_directory_exists(tmp_path, breakage):
    data = generate(tmp_path / "data", 4, seed=1, size=32)
    if breakage == "no_tab":
        with open(data / TOKEN_FILE, "a", encoding="utf-8") as f:
            f.write("image_without_a_tab.jpg#0 a caption\n")
    else:
        data = tmp_path / "no_such_data"
    out = tmp_path / "runs" / "new_run"
    r = subprocess.run([sys.executable, "distributed/train.py", "--data", str(data), "--out", str(out),
                        "--preset", "tiny", "--threads", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not out.parent.exists()


def test_special_files_in_the_image_folder_never_hang_or_crash_the_check_or_training(tmp_path, caplog):
    data = generate(tmp_path / "data", 8, seed=2, size=32)
    images = data / "Images"
    names = sorted(p.name for p in images.iterdir())[:3]
    for name in names:
        (images / name).unlink()
    os.mkfifo(images / names[0])  # opening it for reading would block forever
    (images / names[1]).symlink_to("/dev/zero")  # reading it never ends
    (images / names[2]).symlink_to(names[2])  # a symlink loop: stat raises ELOOP
    (images / "sub").mkdir()
    (images / "sub" / "up").symlink_to("..")  # a directory loop
    r = subprocess.run([sys.executable, "-m", "core.data", "check", str(data)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    for name in names:
        assert f"missing-image: '{name}' is not a file in Images/" in r.stdout, r.stdout
    cfg = parse_config(["--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--skip-list", "none"])
    loaded, _ = load_data(cfg, SINGLE)
    assert sorted(loaded.captions) == sorted(p.name for p in images.iterdir() if p.is_file())
    assert "3 captioned image(s) missing" in caplog.text
