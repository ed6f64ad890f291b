"""Every command: a console script in pyproject.toml whose target exists, and the script forms still run."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_targets_a_main(name):
    module, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), func)), SCRIPTS[name]


@pytest.mark.parametrize("script", ["distributed/train.py", "export/to_onnx.py"])
def test_scripts_run_from_another_directory(script, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


@pytest.mark.parametrize(("module", "flag", "value", "message"), [
    ("export.runtime.caption", "--batch-size", "0", "must be 1 or more, got 0"),
    ("export.runtime.caption", "--threads", "two", "expected a whole number, got two"),
    ("export.serve.server", "--max-batch", "-3", "must be 1 or more, got -3"),
    ("export.serve.server", "--timeout-s", "nan", "must be more than 0, got nan"),
    ("export.serve.server", "--max-body-mb", "inf", "must be more than 0, got inf"),
])
def test_counts_and_limits_refuse_what_is_not_positive(module, flag, value, message, capsys):
    """One rule (core.cli.positive_int / positive_float) in every command: a usage error naming the flag."""
    parser = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and message in err


def test_the_caption_command_and_the_server_share_the_model_flags():
    """One declaration (export.runtime.add_model_args) and one loader (load_captioner) behind both commands."""
    from export.runtime.caption import build_parser as caption_parser
    from export.serve.server import build_parser as serve_parser

    flags = ["--model", "m", "--backend", "eager", "--precision", "fp32", "--beam-size", "2", "--max-decode-len", "9",
             "--length-norm", "0.7", "--search", "tutorial", "--expect-sha256", "ab12", "--threads", "1", "--no-verify"]
    cap, srv = caption_parser().parse_args(flags), serve_parser().parse_args(flags)
    for key in ("model", "backend", "precision", "beam_size", "max_decode_len", "length_norm", "search",
                "expect_sha256", "threads", "no_verify", "device"):
        assert getattr(cap, key) == getattr(srv, key), key


def test_dataset_flags_are_the_same_in_every_command():
    """core.evaluate names its directory --data, core.data a positional DATA_DIR; the rest is one declaration."""
    from core.data import build_parser as data_parser
    from core.evaluate import build_parser as evaluate_parser

    info = data_parser().parse_args(["info", "/d", "--dataset", "coco", "--split-seed", "3", "--test-frac", "0.2"])
    ev = evaluate_parser().parse_args(["r.json", "--data", "/d", "--dataset", "coco", "--split-seed", "3",
                                       "--test-frac", "0.2"])
    for key in ("data_dir", "dataset", "karpathy_json", "split_seed", "val_frac", "test_frac"):
        assert getattr(info, key) == getattr(ev, key), key


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """`python -m core.data check DIR | head`: exit 141 like other Unix tools, no BrokenPipeError traceback
    (core.cli.run_main; the caption command, core.evaluate and core.datacheck run under it too)."""
    from core.synthetic import generate

    root = generate(tmp_path / "data", 3, seed=1, size=32)
    proc = subprocess.Popen([sys.executable, "-m", "core.data", "check", str(root), "--no-skip-list"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    proc.stdout.close()  # the reader is gone before the command writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "Exception ignored" not in err, err
