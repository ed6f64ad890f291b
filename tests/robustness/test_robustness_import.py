"""Hostile tutorial checkpoints and word maps, every one built from the tutorial's own class names (so the pickle
loads): each is refused by `python -m core.import_tutorial` with one line and exit 2, no traceback, nothing written.

Classes of fault, several files each: module trees that recurse (cycles, 2,000 deep); run fields of the wrong kind
(deep lists, stand-in objects, 5 MB strings); declared sizes past every bound (zero-stride tensors declaring a
vocabulary of 2^31 or a decoder of 10^6 units); tensors of the wrong kind or shape, or not finite; config fields out
of range; word maps that are not word maps. A valid file built the same way imports (the faults are the only
difference).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.import_tutorial import main
from tests.support.time_limit import time_limit
from tests.support.tutorial_files import MODELS, WORD_MAP, Pickles, module, save, tutorial_state

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder(state, name: str) -> Pickles:
    return state["decoder"].attrs["_modules"][name]


def _set_param(state, name: str, key: str, value: Any) -> dict:
    _decoder(state, name).attrs["_parameters"][key] = value
    return state


def _nested(depth: int, leaf: Any = 0) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def _chain(depth: int) -> Pickles:
    """A Sequential holding a Sequential holding ... ``depth`` deep."""
    top = node = module(nn.Sequential)
    for _ in range(depth):
        child = module(nn.Sequential)
        node.attrs["_modules"]["0"] = child
        node = child
    return top


def _cycle(state):
    resnet = state["encoder"].attrs["_modules"]["resnet"]
    resnet.attrs["_modules"]["4"].attrs["_modules"]["0"].attrs["_modules"]["x"] = resnet
    return state


def _decoder_cycle(state):
    _decoder(state, "attention").attrs["_modules"]["again"] = state["decoder"]
    return state


def _deep_modules(state):
    state["encoder"].attrs["_modules"]["resnet"].attrs["_modules"]["8"] = _chain(2_000)
    return state


def _zero_stride_vocab(state):
    """Embedding and fc declaring 2^31 rows, in a file of a few kB (an 8.4 GB allocation if believed)."""
    rows = 2**31
    _set_param(state, "embedding", "weight", torch.zeros(1).expand(rows, 8))
    _set_param(state, "fc", "weight", torch.zeros(1).expand(rows, 16))
    return _set_param(state, "fc", "bias", torch.zeros(1).expand(rows))


def _zero_stride_decoder_dim(state):
    _set_param(state, "init_h", "weight", torch.zeros(1).expand(10**6, 512))
    return _set_param(state, "init_h", "bias", torch.zeros(1).expand(10**6))


def _too_many_parameters(state):
    """Each dimension within its bound, the model they describe far over the parameter bound."""
    _set_param(state, "embedding", "weight", torch.zeros(1).expand(900_000, 16_000))
    return state


def _adaptive_pool(value):
    def mutate(state):
        state["encoder"].attrs.pop("enc_image_size")
        state["encoder"].attrs["_modules"]["adaptive_pool"] = value
        return state
    return mutate


def _field(where: str, key: str, value: Any):
    def mutate(state):
        target = state if where == "top" else state["encoder"].attrs if where == "encoder" else \
            _decoder(state, "dropout").attrs
        target[key] = value
        return state
    return mutate


def _rename_stage(state):
    mods = state["encoder"].attrs["_modules"]["resnet"].attrs["_modules"]
    mods["x"] = mods.pop("4")
    return state


def _rename_block(state):
    stage = state["encoder"].attrs["_modules"]["resnet"].attrs["_modules"]["5"].attrs["_modules"]
    stage["x"] = stage.pop("1")
    return state


def _data_parallel_without_module(state):
    state["decoder"] = module(nn.DataParallel)
    return state


def _params_as_list(state):
    _decoder(state, "fc").attrs["_parameters"] = [torch.zeros(9, 16)]
    return state


def _nan(key_path: tuple[str, str], value: float):
    def mutate(state):
        t = _decoder(state, key_path[0]).attrs["_parameters"][key_path[1]].detach().clone()
        t.view(-1)[3] = value
        return _set_param(state, *key_path, t)
    return mutate


def _top(value: Any):
    return lambda state: value


HOSTILE_CHECKPOINTS = {
    # module trees that recurse
    "cyclic_modules": _cycle,
    "cyclic_decoder": _decoder_cycle,
    "modules_2000_deep": _deep_modules,  # over the bound and over Python's recursion limit
    # run fields copied into the output and printed
    "epoch_100000_deep_list": _field("top", "epoch", _nested(100_000)),
    "epoch_a_stand_in_object": _field("top", "epoch", module(MODELS.Attention)),
    "epoch_a_5mb_string": _field("top", "epoch", "9" * (5 << 20)),
    "bleu4_nan": _field("top", "bleu-4", math.nan),
    "bleu4_a_dict": _field("top", "bleu-4", {"a": 1}),
    # declared sizes past the bounds (zero-stride tensors: tiny files)
    "vocabulary_of_2_31_rows": _zero_stride_vocab,
    "decoder_dim_10_6": _zero_stride_decoder_dim,
    "model_over_the_parameter_bound": _too_many_parameters,
    # tensors of the wrong kind, shape or value
    "parameter_not_a_tensor": lambda s: _set_param(s, "fc", "weight", "a string"),
    "parameters_as_a_list": _params_as_list,
    "embedding_1d": lambda s: _set_param(s, "embedding", "weight", torch.zeros(9)),
    "fc_wrong_shape": lambda s: _set_param(s, "fc", "weight", torch.zeros(9, 17)),
    "vocabulary_of_3_rows": lambda s: _set_param(s, "embedding", "weight", torch.zeros(3, 8)),
    "integer_weights": lambda s: _set_param(s, "init_c", "weight", torch.zeros(16, 512, dtype=torch.int64)),
    "nan_weight": _nan(("fc", "weight"), math.nan),
    "inf_weight": _nan(("decode_step", "weight_hh"), math.inf),
    # config fields out of range
    "grid_abc": _field("encoder", "enc_image_size", "abc"),
    "grid_minus_3": _field("encoder", "enc_image_size", -3),
    "grid_true": _field("encoder", "enc_image_size", True),
    "grid_10_9": _field("encoder", "enc_image_size", 10**9),
    "adaptive_pool_a_dict": _adaptive_pool({"output_size": 14}),
    "adaptive_pool_uneven": _adaptive_pool(module(nn.AdaptiveAvgPool2d, output_size=(2, 3))),
    "dropout_7": _field("dropout", "p", 7),
    "dropout_half": _field("dropout", "p", "half"),
    "stage_named_x": _rename_stage,
    "block_named_x": _rename_block,
    "data_parallel_without_module": _data_parallel_without_module,
    # not a checkpoint of the tutorial at all
    "a_list": _top([1, 2, 3]),
    "keys_of_mixed_types": _top({1: "a", "b": 2, None: 3}),
}


def _word_map_as(text: str):
    return lambda path: path.write_text(text)


HOSTILE_WORD_MAPS = {
    "nested_200000_deep": _word_map_as("[" * 200_000 + "]" * 200_000),
    "ids_as_booleans": _word_map_as(json.dumps({**WORD_MAP, "a": True})),
    "ids_not_0_to_n": _word_map_as(json.dumps({**WORD_MAP, "a": 900})),
    "a_word_of_1_mb": _word_map_as(json.dumps({**{k: v for k, v in WORD_MAP.items() if k != "a"}, "a" * (1 << 20): 1})),
    "an_integer_of_5000_digits": _word_map_as(json.dumps({**WORD_MAP, "a": 0}).replace(": 0", ": " + "1" * 5000, 1)),
    "not_json": _word_map_as("\x00\xff not json"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """(valid checkpoint, its word map)."""
    root = tmp_path_factory.mktemp("tutorial_files")
    (root / "WORDMAP.json").write_text(json.dumps(WORD_MAP))
    return save(tutorial_state(), root / "valid.pth.tar"), root / "WORDMAP.json"


def _refused(ckpt: Path, wm: Path, out: Path, capsys) -> str:
    with time_limit(20):
        code = main([str(ckpt), str(wm), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and len(err) < 600, err[:2000]
    assert not out.exists()
    return err


def test_the_valid_file_built_the_same_way_imports(files, tmp_path, capsys):
    ckpt, wm = files
    with time_limit(60):
        assert main([str(ckpt), str(wm), "--out", str(tmp_path / "model.pt")]) == 0
    assert "resnet18, 2x2 regions, vocabulary 9" in capsys.readouterr().out


@pytest.mark.parametrize("fault", sorted(HOSTILE_CHECKPOINTS))
def test_a_hostile_checkpoint_is_one_line_and_exit_2(fault, files, tmp_path, capsys):
    ckpt = save(HOSTILE_CHECKPOINTS[fault](tutorial_state()), tmp_path / f"{fault}.pth.tar")
    err = _refused(ckpt, files[1], tmp_path / "out.pt", capsys)
    assert str(ckpt) in err


@pytest.mark.parametrize("fault", sorted(HOSTILE_WORD_MAPS))
def test_a_hostile_word_map_is_one_line_and_exit_2(fault, files, tmp_path, capsys):
    wm = tmp_path / "WORDMAP.json"
    HOSTILE_WORD_MAPS[fault](wm)
    err = _refused(files[0], wm, tmp_path / "out.pt", capsys)
    assert str(wm) in err


def test_the_command_refuses_nan_weights_with_one_line(files, tmp_path):
    """The real command line (one subprocess): exit 2, one line naming the tensor, no traceback, nothing written."""
    ckpt = save(HOSTILE_CHECKPOINTS["nan_weight"](tutorial_state()), tmp_path / "nan.pth.tar")
    r = subprocess.run([sys.executable, "-m", "core.import_tutorial", str(ckpt), str(files[1]), "--out",
                        str(tmp_path / "out.pt")], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == f"error: {ckpt}: 'decoder.fc.weight' holds NaN or infinite values: a diverged training run?\n"
    assert not (tmp_path / "out.pt").exists()
