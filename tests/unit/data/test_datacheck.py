"""The dataset check (core/datacheck.py, `python -m core.data check`): every planted bad file is found, nothing else.

The bad inputs are generated here (tests/support/corpus.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from tests.support import corpus
import core.images
from core import datacheck
from core.captions import DataFormatError, parse_caption_line, parse_token_file
from core.data import apply_skip_list, load_dataset
from core.datacheck import DataCheckError, check_dataset, write_skip_list
from core.images import ImageLoadError, load_image, to_rgb
from core.skiplist import SkipListError, dataset_listing_hash, read_skip_list
from core.synthetic import generate
from tests.unit.test_images import png_broken_chunk

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "Flickr8k.token.txt"


def _la_is_unsupported() -> bool:
    """Whether core.images.to_rgb fails on mode "La" (Pillow versions differ); if not, the La TIFF is a valid image."""
    try:
        to_rgb(Image.new("La", (2, 2)))
    except ValueError:
        return True
    return False


# Image files planted under Images/ (each gets a caption line, so only its own problem is expected).
BAD_IMAGES = {
    "empty.jpg": (b"", "empty-file"),
    "truncated.jpg": (corpus.truncated_jpeg(), "truncated"),
    "truncated_png.png": (corpus.truncated_png(), "truncated"),
    "readme.jpg": (corpus.text_named_jpg(), "not-an-image"),
    "error_page.jpg": (corpus.html_error_page(), "not-an-image"),
    "bomb.png": (corpus.png_bomb_header(), "decompression-bomb"),
    "corrupt.png": (corpus.corrupt_png(), "corrupt"),
    "animation.gif": (corpus.gif(), "unsupported-format"),
    "tiny.jpg": (corpus.jpeg((4, 4)), "too-small"),
    "strip.png": (corpus.png((1, 64)), "too-small"),
    "panorama.jpg": (corpus.jpeg((20, 600)), "extreme-aspect"),
    "premultiplied.tif": (corpus.tiff_premultiplied_grey_alpha(), "unsupported-mode"),
    "icon.jpg": (corpus.encode(Image.new("RGB", (32, 32), (9, 99, 199)), "ICO"), "unsupported-format"),
    "paintbrush.png": (corpus.encode(Image.new("RGB", (32, 32), (9, 99, 199)), "PCX"), "unsupported-format"),
    "broken_chunk.png": (png_broken_chunk(), "corrupt"),  # Pillow raises SyntaxError, not OSError
}


def make_dataset(root: Path, n: int = 6) -> Path:
    generate(root, n, seed=3, size=32)
    return root


def plant(root: Path) -> set[tuple[str, int | None, str]]:
    """Plant one of each bad input into a synthetic dataset; return the expected (path, line, kind) set."""
    images = root / "Images"
    expected: set[tuple[str, int | None, str]] = set()
    token = root / TOKEN
    lines = token.read_bytes().splitlines(keepends=True)
    first_name = lines[0].split(b"#")[0].decode()
    add: list[bytes] = []

    def line(raw: bytes) -> int:
        add.append(raw)
        return len(lines) + len(add)

    for name, (data, kind) in BAD_IMAGES.items():
        (images / name).write_bytes(data)
        line(f"{name}#0\ta picture of something\n".encode())
        if kind != "unsupported-mode" or _la_is_unsupported():
            expected.add((f"Images/{name}", None, kind))
    for name, data in corpus.valid_variants().items():  # awkward but valid: must NOT be reported
        (images / name).write_bytes(data)
        line(f"{name}#0\ta picture of something\n".encode())
    # Entries of Images/ that are not dataset images: ignored.
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (images / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (images / "notes.txt").write_text("where these pictures came from\n")
    (images / "subdir").mkdir()
    (images / "subdir" / "nested.jpg").write_bytes(corpus.jpeg())

    (images / "uncaptioned.jpg").write_bytes(corpus.jpeg((40, 40), seed=21))
    expected.add(("Images/uncaptioned.jpg", None, "no-captions"))
    expected.add((TOKEN, line(b"a line without any tab at all\n"), "bad-caption-line"))
    expected.add((TOKEN, line(f"{first_name}#one\ta caption with a bad number\n".encode()), "bad-caption-line"))
    expected.add((TOKEN, line(f"{first_name}#7\t   \n".encode()), "bad-caption-line"))
    expected.add((TOKEN, line(b"missing_image.jpg#0\ta red circle\n"), "missing-image"))
    expected.add((TOKEN, line(lines[1]), "duplicate-caption"))  # the same IMAGE#N again
    text = lines[2].split(b"\t", 1)[1]
    expected.add((TOKEN, line(lines[2].split(b"#")[0] + b"#9\t" + text.upper()), "duplicate-caption"))
    expected.add((TOKEN, line(f"{first_name}#8\ta caf".encode() + b"\xe9 circle\n"), "not-utf8"))
    line(b"\n")  # blank lines are fine
    token.write_bytes(b"".join(lines + add))
    return expected


@pytest.fixture
def planted(tmp_path):
    root = make_dataset(tmp_path / "data")
    return root, plant(root)


def found(report) -> set[tuple[str, int | None, str]]:
    return {(p.path, p.line, p.kind) for p in report.problems}


def check_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m core.data check` once core.data registers the subcommand, else `python -m core.datacheck`."""
    from core import data

    has_check = "check" in data.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    cmd = ["-m", "core.data", "check"] if has_check else ["-m", "core.datacheck"]
    return subprocess.run([sys.executable, *cmd, str(root), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def parse_output(root: Path, stdout: str) -> set[tuple[str, int | None, str]]:
    out = set()
    prefix = str(root) + os.sep
    for text in stdout.splitlines():
        if not text.startswith(prefix):
            continue
        m = re.match(r"^(.*?)(?::(\d+))?: ([a-z0-9-]+): ", text[len(prefix):])
        assert m, f"not 'path[:line]: kind: message': {text!r}"
        out.add((m[1], int(m[2]) if m[2] else None, m[3]))
    return out


# --------------------------------------------------------------------------------------------
def test_every_planted_problem_is_reported_and_nothing_else(planted):
    """The acceptance test of the issue, through the command line."""
    root, expected = planted
    proc = check_cli(root)
    assert proc.returncode == 1, proc.stderr
    assert parse_output(root, proc.stdout) == expected
    assert "problems:" in proc.stdout and "skip list:" in proc.stdout
    skip = read_skip_list(root / "skip_list.json", root=root)
    bad_images = {p.split("/", 1)[1] for p, _, k in expected if p.startswith("Images/")}
    assert skip.names == bad_images | {"missing_image.jpg"}
    assert skip.bad_lines == sorted(n for p, n, k in expected if k in ("bad-caption-line", "not-utf8"))


def test_in_process_report_matches_and_is_the_same_with_any_number_of_workers(planted):
    root, expected = planted
    one, four = check_dataset(root, workers=1), check_dataset(root, workers=4)
    assert found(one) == expected
    assert one.problems == four.problems and one.skip == four.skip
    assert one.skip == sorted(one.skip)
    assert one.num_images == 6 + len(BAD_IMAGES) + len(corpus.valid_variants()) + 1
    assert one.num_ignored == 4  # .DS_Store, ._00000.jpg, notes.txt, subdir/
    for p in one.problems:
        assert str(p).startswith(f"{p.path}{'' if p.line is None else f':{p.line}'}: {p.kind}: ")


def test_clean_dataset_exits_0_with_an_empty_skip_list(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n=4)
    assert datacheck.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "checked 4 images (4 ok), 20 caption lines" in out
    skip = read_skip_list(root / "skip_list.json", root=root)
    assert skip.skip == {} and skip.bad_lines == []


@pytest.mark.parametrize("layout", ["no_dir", "no_images", "no_captions", "empty_captions"])
def test_unusable_input_exits_2(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "no_dir":
        make_dataset(root, n=1)
        if layout == "no_images":
            for f in (root / "Images").iterdir():
                f.unlink()
            (root / "Images").rmdir()
        elif layout == "no_captions":
            (root / TOKEN).unlink()
        else:
            (root / TOKEN).write_text("\n\n")
    assert datacheck.main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root) in err
    assert not (root / "skip_list.json").exists()
    with pytest.raises(DataCheckError):
        check_dataset(root)


def test_unwritable_skip_list_exits_2_with_the_path(planted, capsys):
    root, _ = planted
    blocker = root / "a_file"
    blocker.write_text("x")
    assert datacheck.main([str(root), "--skip-list", str(blocker / "skip.json")]) == 2
    assert "cannot write the skip list" in capsys.readouterr().err


def test_size_limit_is_read_from_the_header_and_nothing_is_decoded(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", n=2)
    (root / "Images" / "big.png").write_bytes(corpus.png((200, 150)))
    with open(root / TOKEN, "a") as f:
        f.write("big.png#0\ta big picture\n")
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    report = check_dataset(root, max_pixels=100 * 100)
    assert found(report) == {("Images/big.png", None, "decompression-bomb")}
    assert "30000 pixels is over the limit of 10000" in report.problems[0].message
    assert set(decoded) == {(32, 32)}  # the two synthetic images; big.png never decoded
    # The loader's limit applies by default, read when the check runs.
    monkeypatch.setattr(core.images, "MAX_PIXELS", 20_000)
    assert found(check_dataset(root)) == {("Images/big.png", None, "decompression-bomb")}
    monkeypatch.setattr(core.images, "MAX_PIXELS", 40_000)
    assert check_dataset(root).ok


def test_truncated_files_fail_even_if_someone_turned_on_load_truncated_images(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", n=1)
    (root / "Images" / "00000.jpg").write_bytes(corpus.truncated_jpeg())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = check_dataset(root)
    assert found(report) == {("Images/00000.jpg", None, "truncated")}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_the_check_agrees_with_the_training_loader(planted):
    """Images the check accepts load with core.images.load_image; those it rejects for their content do not."""
    root, _ = planted
    report = check_dataset(root)
    bad = {p.path.split("/", 1)[1]: p.kind for p in report.problems if p.path.startswith("Images/")}
    by_rule = {"too-small", "extreme-aspect", "no-captions"}  # rules of the check only: the loader takes them
    for f in sorted((root / "Images").iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.suffix == ".txt":
            continue
        if f.name not in bad or bad[f.name] in by_rule:
            assert load_image(f).mode == "RGB", f.name
        else:
            with pytest.raises(ImageLoadError, match=re.escape(f.name)) as info:
                load_image(f)
            assert info.value.kind == bad[f.name]


@pytest.mark.parametrize("line", [
    "00000.jpg#0\ta red circle",
    "  00000.jpg#12 \t a red circle  ",
    "a#b.jpg#3\tan image name with a hash",
    "no tab here",
    "00000.jpg\tno number",
    "#0\tno name",
    "00000.jpg#x\tnot a number",
    "00000.jpg#1\t   ",
])
def test_caption_line_rule_is_the_one_of_core_data(tmp_path, line):
    f = tmp_path / "t.txt"
    f.write_text(line + "\n")
    try:
        name, n, caption = parse_caption_line(line)
    except ValueError as e:
        with pytest.raises(DataFormatError, match=re.escape(str(e)[:30])):
            parse_token_file(f)
    else:
        assert parse_token_file(f) == {name: [caption]}


def test_skip_list_is_deterministic_and_tied_to_the_dataset_listing(planted, tmp_path):
    root, _ = planted
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_skip_list(check_dataset(root, workers=1), a)
    write_skip_list(check_dataset(root, workers=3), b)
    assert a.read_bytes() == b.read_bytes()  # every rank that runs the check gets the same file
    data = json.loads(a.read_text())
    assert data["listing_hash"] == dataset_listing_hash(root) and str(root) not in a.read_text()
    assert read_skip_list(a, root=root).skip == data["skip"]
    # The dataset changes after the check: the old list is refused, with the command that fixes it.
    (root / "Images" / "new.jpg").write_bytes(corpus.jpeg())
    with pytest.raises(SkipListError, match="another version of the dataset.*core.data check"):
        read_skip_list(a, root=root)
    read_skip_list(a)  # without a root nothing is compared
    for bad in ("{not json", json.dumps({"format": "something else"}),
                json.dumps({**data, "version": 99}), json.dumps({**data, "skip": ["a.jpg"]})):
        a.write_text(bad)
        with pytest.raises(SkipListError, match=str(a.name)):
            read_skip_list(a)
    with pytest.raises(SkipListError, match="not found"):
        read_skip_list(tmp_path / "nope.json")


def test_listing_hash_ignores_times_and_location(tmp_path):
    import shutil

    root = make_dataset(tmp_path / "data", n=2)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    os.utime(copy / "Images" / "00000.jpg", (1, 1))
    assert dataset_listing_hash(copy) == dataset_listing_hash(root)
    with open(copy / TOKEN, "a") as f:
        f.write("00000.jpg#5\tone more caption\n")
    assert dataset_listing_hash(copy) != dataset_listing_hash(root)


def test_apply_skip_list_removes_images_and_keeps_the_other_splits(tmp_path):
    root = make_dataset(tmp_path / "data", n=10)
    (root / "Images" / "00003.jpg").write_bytes(corpus.truncated_jpeg())
    report = check_dataset(root)
    write_skip_list(report, root / "skip_list.json")
    data = load_dataset(root)
    kept = apply_skip_list(data, read_skip_list(root / "skip_list.json", root=root))
    assert "00003.jpg" not in kept.captions
    for split in ("train", "val", "test"):
        assert kept.splits[split] == [n for n in data.splits[split] if n != "00003.jpg"]


def test_core_data_check_subcommand_is_registered():
    """`python -m core.data check` needs a one-line hook in core/data.py's build_parser()."""
    from core import data

    choices = data.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    if "check" not in choices:
        pytest.skip("core/data.py build_parser() does not call core.datacheck.add_check_command(sub) yet")
    args = data.build_parser().parse_args(["check", "somewhere", "--workers", "2"])
    assert args.func is datacheck.run_check and args.workers == 2


def test_listing_hash_ignores_hidden_files_that_copy_tools_add(tmp_path):
    root = make_dataset(tmp_path / "data", n=2)
    before = dataset_listing_hash(root)
    (root / "Images" / ".DS_Store").write_bytes(b"\x00" * 64)
    (root / "Images" / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert dataset_listing_hash(root) == before
    (root / "Images" / "00001.jpg").write_bytes(corpus.jpeg((20, 20)))
    assert dataset_listing_hash(root) != before


def test_a_coco_layout_is_checked_file_by_file_and_caption_by_caption(tmp_path, capsys):
    """The Karpathy-file layouts: the JSON's captions by training's rule, the images of train2014/ and val2014/."""
    root = generate(tmp_path / "coco", 12, seed=5, size=32, layout="coco")
    meta = json.loads((root / "dataset_coco.json").read_text())
    first, second = meta["images"][0], meta["images"][1]
    first["sentences"] += [{"raw": "..."}, {"raw": first["sentences"][0]["raw"].upper()}]
    (root / "dataset_coco.json").write_text(json.dumps(meta))
    broken = f"{first['filepath']}/{first['filename']}"
    (root / broken).write_bytes((root / broken).read_bytes()[:200])  # truncated
    missing = f"{second['filepath']}/{second['filename']}"
    (root / missing).unlink()
    extra = f"{first['filepath']}/uncaptioned.jpg"
    Image.new("RGB", (32, 32)).save(root / extra)

    assert datacheck.main([str(root)]) == 1
    out = capsys.readouterr().out
    kinds = {(m.group(1), m.group(2)) for m in re.finditer(r"^\S+/(\S+?): (\S+):", out, re.M)}
    assert kinds == {("dataset_coco.json", "duplicate-caption"), ("dataset_coco.json", "empty-caption"),
                     ("dataset_coco.json", "missing-image"), (broken.split("/")[1], "truncated"),
                     ("uncaptioned.jpg", "no-captions")}
    assert f"'{missing}' is not a file in {second['filepath']}/" in out
    n = len(first["sentences"])  # the two added sentences are the last two
    assert f"sentence {n - 2}: " in out and f"sentence {n - 1}: same caption for {broken} as sentence 0" in out
    skip = read_skip_list(root / "skip_list.json", root=root)
    assert set(skip.skip) == {broken, missing, extra}
    # what training reads: the skipped names are the layout's own (filepath/filename)
    with pytest.warns(UserWarning, match="missing from"):  # the deleted file, which the loader drops by itself
        data = apply_skip_list(load_dataset(root), skip)
    assert broken not in data.captions and missing not in data.captions


def test_the_listing_hash_covers_a_karpathy_file_and_its_image_folders(tmp_path):
    root = generate(tmp_path / "f30k", 6, seed=5, size=32, layout="flickr30k")
    before = dataset_listing_hash(root)
    meta = json.loads((root / "dataset_flickr30k.json").read_text())
    meta["images"][0]["sentences"][0]["raw"] = "a changed caption"
    (root / "dataset_flickr30k.json").write_text(json.dumps(meta))
    after_json = dataset_listing_hash(root)
    image = next((root / "flickr30k-images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert len({before, after_json, dataset_listing_hash(root)}) == 3
    assert check_dataset(root).ok


def test_a_broken_karpathy_file_is_unusable_input_naming_the_field(tmp_path, capsys):
    root = generate(tmp_path / "coco", 4, seed=5, size=32, layout="coco")
    meta = json.loads((root / "dataset_coco.json").read_text())
    meta["images"][2]["sentences"][1] = {"tokens": ["no", "raw"]}
    (root / "dataset_coco.json").write_text(json.dumps(meta))
    assert datacheck.main([str(root), "--dataset", "coco"]) == 2
    assert "images[2].sentences[1].raw" in capsys.readouterr().err


def test_a_caption_naming_a_path_outside_the_image_folder_lists_nothing_there(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n=2)
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.jpg")  # in the parent of the dataset: never checked
    with open(root / TOKEN, "a", encoding="utf-8") as f:
        f.write("../../outside.jpg#0\tan escaping name\n")
    assert datacheck.main([str(root), "--no-skip-list"]) == 1
    out = capsys.readouterr().out
    assert "missing-image: '../../outside.jpg' is not a file in Images/" in out
    assert "checked 2 images" in out and "no-captions" not in out


def test_a_link_out_of_the_image_folder_is_named_and_skip_listed_and_never_opened(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n=2)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"TOPSECRET-KEY=hunter2")  # would be "not-an-image" if it were ever read
    (root / "Images" / "linked.jpg").symlink_to(secret)
    (root / "Images" / "inside.jpg").symlink_to(root / "Images" / "00000.jpg")  # a link inside: checked as usual
    with open(root / TOKEN, "a", encoding="utf-8") as f:
        f.write("linked.jpg#0\ta link out of the folder\ninside.jpg#0\ta link inside the folder\n")
    assert datacheck.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "Images/linked.jpg: outside-root: a symbolic link that leads out of the image folder" in out
    assert "TOPSECRET" not in out and "inside.jpg" not in out
    skip = read_skip_list(root / "skip_list.json", root=root)
    assert list(skip.skip) == ["linked.jpg"]
