"""python -m export.caption: end to end through a subprocess, JSON lines, bad files, dataset mode, figures."""

from __future__ import annotations

import json
import subprocess

import pytest
from tests.support.export_artifacts import PYTHON, ROOT, artifacts

from export.runtime import caption


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


def run_cli(*args, timeout=120):
    return subprocess.run([PYTHON, "-m", "export.caption", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_end_to_end_json_bad_file_dataset_figures(art, tmp_path):
    """One subprocess (imports are the slow part): explicit images with a broken one among them, plus what
    `./launch.sh demo` runs (held-out images of a Flickr8k-layout dataset, figures, BLEU), as JSON lines."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    images = art.image_paths[:2]
    figs = tmp_path / "figs"
    proc = run_cli(images[0], bad, images[1], "--data", art.data_dir, "--split", "test", "--limit", "2",
                   "--model", art.export_dir, "--backend", "ort", "--beam-size", "3", "--json", "--threads", "1",
                   "--save-dir", figs, "--batch-size", "2")
    assert proc.returncode == 1, proc.stderr  # one file failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["file"] for d in lines[:3]] == [str(images[0]), str(bad), str(images[1])] and len(lines) == 5
    assert set(lines[0]) == {"file", "caption", "score"} and lines[0]["caption"]
    assert "error" in lines[1] and "caption" not in lines[1]
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and str(bad) in err_lines[0]
    assert "4 captioned, 1 failed" in proc.stderr
    # one line: the provider that runs and why core.hardware chose it
    assert any("CPUExecutionProvider" in line and "ONNX Runtime CPU provider" in line
               for line in proc.stderr.splitlines()), proc.stderr
    assert "BLEU-4" in proc.stderr and "CIDEr-D" in proc.stderr  # metrics of the --data images
    names = sorted(p.name for p in figs.iterdir())
    assert len([n for n in names if n.endswith("_attention.png")]) == 4 and len(names) == 8


def test_cli_in_process_backends_agree_and_file_list(art, tmp_path, capsys):
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(p) for p in art.image_paths[:3]) + "\n")
    outputs = {}
    for backend, model in (("ort", art.export_dir), ("torchscript", art.export_dir), ("eager", art.checkpoint),
                           ("eager", art.export_dir)):
        rc = caption.main(["--file-list", str(listing), "--model", str(model), "--backend", backend, "--beam-size", "3",
                           "--batch-size", "2", "--threads", "1"])
        assert rc == 0
        outputs[(backend, str(model))] = capsys.readouterr().out
    first = next(iter(outputs.values()))
    assert len(first.splitlines()) == 3
    assert all(o == first for o in outputs.values()), outputs


def test_cli_directory_input_progress_lines_and_empty_directory(art, tmp_path, capsys):
    rc = caption.main([str(art.image_paths[0].parent), "--model", str(art.export_dir), "--beam-size", "1",
                       "--batch-size", "16", "--threads", "1", "--progress-every", "15"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.splitlines()) == 40
    # stderr is not a terminal here: no bar, a line every 15 images with the count, the rate and the time left
    progress = [line for line in err.splitlines() if "images/s" in line and " left" in line]
    assert [line.split()[1] for line in progress] == ["15/40", "30/40"], err
    assert "\r" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = caption.main([str(empty), str(art.image_paths[0]), "--model", str(art.export_dir), "--beam-size", "1"])
    out, err = capsys.readouterr()
    assert rc == 1 and len(out.splitlines()) == 1 and f"{empty}: directory holds no image files" in err


def test_progress_bar_only_on_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert caption.Progress(10, 5, stream=io.StringIO()).bar.disable
    assert not caption.Progress(10, 5, stream=Terminal()).bar.disable


def test_beam_0_is_refused_by_argument_parsing_before_any_model_loads(monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(caption, "load_captioner", no_model)
    with pytest.raises(SystemExit) as e:
        caption.main(["a.jpg", "--beam-size", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--beam-size" in err and "must be 1 or more, got 0" in err


def test_a_checkpoint_with_the_onnx_backend_says_what_to_do(art, capsys):
    rc = caption.main([str(art.image_paths[0]), "--model", str(art.checkpoint)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot load the model:")
    assert "--backend eager" in err and "export it first" in err and "export/to_onnx.py" in err
    assert "'" not in err and '"' not in err


def test_urls_are_refused_by_name_and_the_rest_is_captioned(art, tmp_path, capsys):
    url = "https://example.com/dog.jpg"
    listing = tmp_path / "files.txt"
    listing.write_text(f"{url}\n")
    rc = caption.main([url, str(art.image_paths[0]), "--file-list", str(listing), "--model", str(art.export_dir),
                       "--beam-size", "1", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 1 and len(out.splitlines()) == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {url}: URLs are not supported; download the image and pass the file"] * 2
    assert "https:/example" not in err


def test_an_unknown_split_is_one_line_without_quotes(art, capsys):
    rc = caption.main(["--data", str(art.data_dir), "--split", "nope", "--model", str(art.export_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "no split nope; choose from" in err
    assert "'" not in err and len(err.strip().splitlines()) == 1


def test_cli_model_errors_exit_2_with_a_clear_message(art, tmp_path, capsys):
    rc = caption.main([str(art.image_paths[0]), "--model", str(tmp_path / "nothing")])
    assert rc == 2 and "export directory not found" in capsys.readouterr().err
    rc = caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "--backend", "eager",
                       "--precision", "int8"])
    assert rc == 2 and "ONNX only" in capsys.readouterr().err
    rc = caption.main(["--model", str(art.export_dir)])
    assert rc == 2 and "nothing to caption" in capsys.readouterr().err


def test_one_flag_name_per_concept(capsys):
    from export.to_onnx import build_parser as export_parser

    args = caption.build_parser().parse_args(["a.jpg", "--beam-size", "4", "--max-decode-len", "9", "--checkpoint", "m.pt"])
    assert (args.beam_size, args.max_decode_len, str(args.model)) == (4, 9, "m.pt")
    for old in (["--max-len", "9"], ["--int8"]):  # names before 0.2, gone (CHANGELOG.md)
        with pytest.raises(SystemExit):
            caption.build_parser().parse_args(["a.jpg", *old])
        assert "unrecognized arguments" in capsys.readouterr().err
    args = export_parser().parse_args(["--model", "m.pt", "--beam-size", "2", "--max-decode-len", "7"])
    assert (str(args.checkpoint), args.beam_size, args.max_decode_len) == ("m.pt", 2, 7)
