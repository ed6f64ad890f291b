"""python -m core.evaluate: results files, image ids, the machine without Java, SPICE skipped before any download.

(Java-backed scoring through the CLI is covered by tests/integration/test_datasets.py, whose COCO run compares it with the
training report, and the golden values by tests/unit/test_metrics.py.)
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from core.evaluate import main
from core.synthetic import generate

pytest.importorskip("pycocoevalcap.bleu.bleu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("eval") / "coco", 40, seed=2, size=32, layout="coco")


def _references(data: Path) -> dict[str, list[str]]:
    from core.data import load_dataset

    d = load_dataset(data)
    return {n: d.captions[n] for n in d.splits.test}


def _write(tmp_path: Path, rows) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    return path


def test_without_java_the_reduced_set_comes_out_with_exit_0(data, tmp_path, monkeypatch, capsys):
    refs = _references(data)
    rows = [{"image_id": n, "caption": caps[0]} for n, caps in refs.items()]  # perfect captions
    monkeypatch.setenv("PATH", str(tmp_path / "no-java-here"))
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda *a, **k: pytest.fail("a download was attempted"))
    assert main([str(_write(tmp_path, rows)), "--data", str(data), "--split", "test",
                 "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "fallback: Python PTB imitation (no java on PATH" in out
    assert "METEOR   unavailable: needs Java" in out and "SPICE    unavailable: needs Java" in out
    scores = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    assert scores["bleu1"] == pytest.approx(1.0) and scores["rouge_l"] == pytest.approx(1.0)


def test_image_ids_may_be_karpathy_ids_or_stems(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-java-here"))  # (scoring itself is not what is tested here)
    refs = _references(data)
    names = sorted(refs)
    rows = [{"image_id": int(Path(names[0]).stem), "caption": "a shape"},  # the cocoid
            {"image_id": Path(names[1]).stem, "caption": "a shape"}]  # the file stem
    assert main([str(_write(tmp_path, rows)), "--data", str(data), "--split", "test"]) == 0
    captured = capsys.readouterr()
    assert "images   2" in captured.out and f"cover 2 of the {len(names)} test images" in captured.err


@pytest.mark.parametrize("rows, expected", [
    ({"image_id": 1}, "expected a JSON list"),
    ([{"caption": "a dog"}], "[0].image_id: missing"),
    ([{"image_id": 0, "caption": "x"}, {"image_id": 0, "caption": 3}], "[1].caption: expected a string"),
    ([{"image_id": "nope.jpg", "caption": "x"}], "[0].image_id 'nope.jpg' is not an image of the test split"),
    ([{"image_id": 0, "caption": "x"}, {"image_id": "00000", "caption": "y"}], "[1].image_id '00000': a second"),
    ([], "no results"),
])
def test_a_bad_results_file_is_named_with_its_entry(data, tmp_path, capsys, rows, expected):
    path = _write(tmp_path, rows)
    assert main([str(path), "--data", str(data), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and expected in err and "Traceback" not in err


def test_spice_is_skipped_before_its_download_when_the_corenlp_jars_are_absent(tmp_path):
    from core.cocoeval import SPICE_JARS, spice_missing

    (tmp_path / "spice" / "lib").mkdir(parents=True)
    reason = spice_missing(tmp_path)
    assert reason.startswith("skipped offline") and all(j in reason for j in SPICE_JARS)
    assert str(tmp_path / "spice" / "lib") in reason and "get_stanford_models" in reason
    for jar in SPICE_JARS:
        (tmp_path / "spice" / "lib" / jar).write_bytes(b"")
    assert spice_missing(tmp_path) is None


def test_scores_print_as_a_table_and_as_one_line_from_their_saved_form():
    from core.cocoeval import CocoScores

    s = CocoScores({"bleu4": 0.25, "cider": 1.5}, {"meteor": "needs Java"}, tokenizer="PTB", images=3)
    back = CocoScores.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert back.line() == "COCO caption metrics (PTB): BLEU-4 0.2500 | METEOR unavailable (needs Java) | CIDEr-D 1.5000"
    assert back.table().splitlines()[2:] == ["BLEU-4   0.2500", "METEOR   unavailable: needs Java", "CIDEr-D  1.5000"]
