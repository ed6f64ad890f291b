"""Image names of caption files that lead outside the dataset (absolute, '../../', a symbolic link out of the image
folder, to a file or through a folder): refused by name by every reader (the token file, Karpathy's files in every
layout) before any file is opened, whatever the skip list says; and by training, evaluation and captioning, with
an audit hook proving that nothing outside the root was opened. Links that stay inside, and image folders that
are themselves links (a dataset on another disk), still load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.captions import KARPATHY_FILES, TOKEN_FILE, OutsideRootError
from core.data import load_dataset
from core.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
KINDS = ("absolute", "dotdot", "link_to_file", "link_to_folder")
IMAGE_DIRS = {"flickr8k": "Images", "flickr30k": "flickr30k-images", "coco": "train2014"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {layout: generate(root / layout, 4, seed=1, size=32, layout=layout) for layout in IMAGE_DIRS}


def _escaping(pristine: dict[str, Path], tmp_path: Path, layout: str, kind: str) -> tuple[Path, str]:
    """A copy of the layout whose first image is renamed in its caption file to a name escaping to
    ``tmp_path/outside/secret.jpg`` (a real JPEG); returns (root, the name)."""
    root = Path(shutil.copytree(pristine[layout], tmp_path / "data", symlinks=True))
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = root / IMAGE_DIRS[layout]
    first = sorted(p.name for p in folder.iterdir())[0]
    shutil.copy(folder / first, outside / "secret.jpg")
    name = {"absolute": str(outside / "secret.jpg"), "dotdot": "../../outside/secret.jpg",
            "link_to_file": "evil.jpg", "link_to_folder": "sub/secret.jpg"}[kind]
    if kind == "link_to_file":
        (folder / "evil.jpg").symlink_to(outside / "secret.jpg")
    elif kind == "link_to_folder":
        (folder / "sub").symlink_to(outside, target_is_directory=True)
    _rename(root, layout, first, name)
    return root, (f"train2014/{name}" if layout == "coco" else name)  # COCO's names are filepath/filename


def _rename(root: Path, layout: str, old: str, new: str) -> None:
    if layout == "flickr8k":
        token = root / TOKEN_FILE
        token.write_text(token.read_text().replace(f"{old}#", f"{new}#"))
        return
    path = root / KARPATHY_FILES[layout]
    data = json.loads(path.read_text())
    entry = next(i for i in data["images"] if i["filename"] == old and i.get("filepath", "train2014") == "train2014")
    entry["filename"] = new
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("layout", sorted(IMAGE_DIRS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_refuses_a_name_outside_the_image_folder(pristine, tmp_path, layout, kind):
    root, name = _escaping(pristine, tmp_path, layout, kind)
    with pytest.raises(OutsideRootError) as refused:
        load_dataset(root)
    message = str(refused.value)
    assert repr(name)[1:-1] in message and "outside the image folder" in message and "\n" not in message


def test_links_that_stay_inside_and_linked_image_folders_load(pristine, tmp_path):
    """A link between two images of the folder, an Images/ that is a link to another disk, COCO's train2014/ as
    a link: all inside the dataset as its owner laid it out."""
    root = Path(shutil.copytree(pristine["flickr8k"], tmp_path / "f8k"))
    shutil.move(root / "Images", tmp_path / "elsewhere")
    (root / "Images").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    first = sorted(p.name for p in (tmp_path / "elsewhere").iterdir())[0]
    (tmp_path / "elsewhere" / "alias.jpg").symlink_to(tmp_path / "elsewhere" / first)
    _rename(root, "flickr8k", first, "alias.jpg")
    assert "alias.jpg" in load_dataset(root).captions
    coco = Path(shutil.copytree(pristine["coco"], tmp_path / "coco"))
    shutil.move(coco / "train2014", tmp_path / "coco_train")
    (coco / "train2014").symlink_to(tmp_path / "coco_train", target_is_directory=True)
    assert any(n.startswith("train2014/") for n in load_dataset(coco).captions)


def test_training_evaluation_and_captioning_refuse_by_name_and_open_nothing_outside(pristine, tmp_path):
    """Each escaping kind given to each command, in one process under an audit hook that records every file
    opened outside the dataset root (the secret folder is below the watched folder, the dataset is not)."""
    commands, names = [], []
    for kind in ("absolute", "dotdot", "link_to_file"):
        root, name = _escaping(pristine, tmp_path / kind, "flickr30k", kind)
        names.append(name)
        results = tmp_path / kind / "results.json"
        results.write_text(json.dumps([{"image_id": "00001.jpg", "caption": "a shape"}]))
        commands += [["core.evaluate:main", str(results), "--data", str(root), "--no-spice"],
                     ["distributed.train:main", "--data", str(root), "--out", str(tmp_path / kind / "run"), "--preset",
                      "tiny", "--threads", "1", "--skip-list", "none"],
                     ["export.runtime.caption:main", "--model", str(tmp_path / "no-model"), "--data", str(root)]]
    argv = [str(tmp_path)] + [a for c in commands for a in ["--", *c]][1:]
    watched = [str(tmp_path / kind / "outside") for kind in ("absolute", "dotdot", "link_to_file")]
    r = subprocess.run([sys.executable, "-m", "tests.support.open_audit", *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[-1])
    for i, run in enumerate(report["runs"]):
        name = names[i // 3]
        assert run["code"] == 2, run
        assert repr(name)[1:-1] in run["stderr"] and "outside the image folder" in run["stderr"], run
        assert "Traceback" not in run["stderr"] and "secret" not in run["stderr"].replace(name, ""), run
    assert not [p for p in report["opened"] if any(p.startswith(w) for w in watched)], report["opened"]
