"""export/to_onnx.py: files, manifest, checker, parity figures, int8 quantization, failure modes.

The export itself runs once per session (tests/support/export_artifacts.py) through the script's command line.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tests.support.export_artifacts import artifacts

from core.checkpoint import model_from_checkpoint
from core.vocab import Vocabulary
from export import manifest as fmt
from export import parity, quantize, to_onnx


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(art):
    return json.loads((art.export_dir / fmt.MANIFEST).read_text())


def test_script_writes_every_file_with_its_hash(art, manifest):
    print(f"\nexport script: {art.export_seconds:.1f} s")
    expected = {fmt.ENCODER_ONNX, fmt.STEP_ONNX, fmt.STEP_INT8_ONNX, fmt.ENCODER_TS, fmt.STEP_TS, fmt.VOCAB,
                fmt.SAFETENSORS, fmt.SAFETENSORS_META}
    assert expected <= set(manifest["files"])
    on_disk = {p.name for p in art.export_dir.iterdir()}
    assert on_disk == set(manifest["files"]) | {fmt.MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == fmt.sha256_file(art.export_dir / name), name
        assert entry["bytes"] == (art.export_dir / name).stat().st_size
    assert "exported" in art.export_log and "int8 step" in art.export_log
    assert "[export] hardware: " in art.export_log  # the machine, in one line (core.hardware.summary)
    # no partial directory is left next to the export
    assert not [p for p in art.export_dir.parent.iterdir() if ".partial-" in p.name]


def test_export_directory_is_readable_by_other_users(art):
    """A service user reads the export: not mkdtemp's 0700, but 0777/0666 less the umask (0755/0644 usually)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert art.export_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for p in art.export_dir.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


def test_manifest_is_self_contained(art, manifest):
    model, vocab = model_from_checkpoint(art.checkpoint)
    cfg = model.cfg
    assert manifest["format"] == fmt.FORMAT and manifest["format_version"] == fmt.FORMAT_VERSION
    assert manifest["model_config"] == cfg.to_dict()
    assert manifest["dims"] == {
        "vocab_size": len(vocab), "encoded_size": 2, "num_pixels": 4, "encoder_dim": 512, "attention_dim": 32,
        "decoder_dim": 32, "embed_dim": 32,
    }
    pre = manifest["preprocess"]
    assert pre["image_size"] == 64 and pre["resize"] == "stretch" and pre["interpolation"] == "bilinear"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert manifest["tokens"] == {"pad_id": 0, "start_id": 1, "end_id": 2, "unk_id": 3, "pad": "<pad>",
                                  "start": "<start>", "end": "<end>", "unk": "<unk>"}
    assert manifest["decode"]["max_len"] == 20
    assert manifest["opset"] >= 17
    assert manifest["exporter"]["onnx"] == "dynamo"
    assert "legacy" in manifest["exporter"]["torchscript"]
    assert manifest["exporter"]["versions"]["torch"] == torch.__version__
    assert manifest["graphs"]["encoder_ts"]["legacy"] is True
    assert manifest["source"]["checkpoint_sha256"] == fmt.sha256_file(art.checkpoint)
    assert Vocabulary.load(art.export_dir / fmt.VOCAB) == vocab
    if not torch.cuda.is_available():
        assert "CUDA" in manifest["fp16"]["skipped"]  # --fp16 on CPU: a clear note, not a failure


def test_graph_signatures_have_dynamic_batch_and_rows(manifest):
    enc, step = manifest["graphs"]["encoder"], manifest["graphs"]["decoder_step"]
    assert enc["inputs"] == {"images": ["N", 3, 64, 64]}
    assert enc["outputs"] == {"enc_out": ["N", 4, 512], "enc_att": ["N", 4, 32], "h": ["N", 32], "c": ["N", 32]}
    v = manifest["dims"]["vocab_size"]
    assert step["inputs"] == {"words": ["M"], "h": ["M", 32], "c": ["M", 32], "enc_out": ["N", 4, 512],
                              "enc_att": ["N", 4, 32]}
    assert step["outputs"] == {"logprobs": ["M", v], "h_next": ["M", 32], "c_next": ["M", 32], "alpha": ["M", 4]}
    assert enc["opset"] == step["opset"] == manifest["opset"]


@pytest.mark.parametrize("name", [fmt.ENCODER_ONNX, fmt.STEP_ONNX, fmt.STEP_INT8_ONNX])
def test_onnx_files_pass_the_full_checker(art, name):
    onnx.checker.check_model(str(art.export_dir / name), full_check=True)


def test_graphs_are_clean_and_optimized(manifest):
    step = manifest["graphs"]["decoder_step"]
    # constant folding done: no Constant/Identity nodes, no leftover training ops
    for g in ("encoder", "decoder_step"):
        ops = manifest["graphs"][g]["ops"]
        assert not {"Constant", "Identity", "Dropout", "BatchNormalization"} & set(ops), ops
    # the LSTMCell is plain matmuls + pointwise gates (no LSTM/Loop/Scan op), fused by ORT where it can
    assert not {"LSTM", "Loop", "Scan", "If"} & set(step["ops"])
    assert step["ops"]["Gemm"] >= 4
    optimized = step["ort_optimized_ops"]
    assert optimized.get("Gemm", 0) + optimized.get("FusedGemm", 0) + optimized.get("FusedMatMul", 0) >= 4
    print("\ndecoder step ops:", step["ops"], "\nafter ORT_ENABLE_ALL:", optimized)


def test_parity_figures_are_recorded_and_small(manifest):
    par = manifest["parity"]
    tol = par["tolerance"]
    for backend in ("onnx", "torchscript"):
        rep = par[backend]
        assert rep["failures"] == []
        assert [r["N"] for r in rep["encoder"]] == [1, 3]
        assert [(r["N"], r["k"]) for r in rep["decoder_step"]] == [(n, k) for n in (1, 3, 8) for k in (1, 3, 5)]
        w = rep["worst"]
        assert w["encoder_rel"] <= tol["encoder"]["rtol"]
        assert w["logprobs_max_abs"] < 1e-4 and w["alpha_max_abs"] < 1e-4 and w["h_max_abs"] < 1e-4
        print(f"\n{backend} vs eager: {w}")
    assert par["captions"]["identical_pct"] == 100.0


def test_int8_step_really_is_quantized(art, manifest):
    q = onnx.load(str(art.export_dir / fmt.STEP_INT8_ONNX))
    consts = {t.name for t in q.graph.initializer}
    ops = [n.op_type for n in q.graph.node]
    # 5 of the 7 weight matmuls: attention decoder_att, f_beta, LSTM hidden, LSTM input (split in its embedding
    # and attention parts, each with its own activation scale); full_att (one column) and fc stay fp32
    assert ops.count("MatMulInteger") == 5
    assert "Gemm" not in ops
    float_weight = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    assert len(float_weight) == 2 and any(".fc.weight" in n.input[1] for n in float_weight)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in q.graph.initializer)
    info = manifest["graphs"]["decoder_step_int8"]
    assert info["quantized_matmuls"] == info["weight_matmuls"] == 5 and info["float_weight_matmuls_left"] == []
    assert sorted(info["kept_float"]) == sorted(n.name for n in float_weight)
    optimized = info["ort_optimized_ops"]
    assert optimized.get("DynamicQuantizeMatMul", 0) + optimized.get("MatMulIntegerToFloat", 0) == 5


def test_int8_encoder_runs_every_convolution_in_int8(art, manifest):
    info = manifest["graphs"]["encoder_int8"]
    assert fmt.ENCODER_INT8_ONNX in manifest["files"]
    # what ONNX Runtime really runs after fusing the QDQ pairs: one QLinearConv per Conv of the fp32 graph
    assert info["int8_convs"] == info["convs"] == manifest["graphs"]["encoder"]["ops"]["Conv"] > 0
    assert "Conv" not in info["ort_optimized_ops"]
    assert info["calibration_images"] == 8  # --calib-images 8 of the training split
    assert len(info["kept_float"]) == 3  # the Linear tail: encoder_att (MatMul), init_h and init_c (Gemm)
    assert info["weight_format"] == manifest["graphs"]["decoder_step_int8"]["weight_format"]


def test_int8_caption_agreement_is_reported(manifest):
    q = manifest["quantization"]["int8"]
    print(f"\nint8 vs fp32 on {q['check_set']}: {q['identical_pct']}% identical, BLEU-4 {q['bleu4_vs_fp32']}, "
          f"vs references {q.get('bleu4_vs_references')}, step along greedy paths {q['step_error_greedy']}")
    assert q["images"] == 4 and q["check_set"] == "4 held-out dataset images"  # the test split of 40 images
    # The weight format comes from core.hardware.choose_int8 (the exporting CPU's VNNI) and is recorded with it.
    vnni = "vnni" in q["exported_on"]
    assert q["weight_format"] == ("u8s8" if vnni else "reduce_range")
    assert q["exported_on"].startswith(("AVX", "DEFAULT"))
    assert q["identical_pct"] >= 75.0
    assert q["bleu4_vs_fp32"] >= 0.5
    assert set(q["bleu4_vs_references"]) == {"fp32", "other"}
    err = q["step_error_greedy"]
    assert err["logprobs_max_abs"] < 0.5 and err["top1_agreement_pct"] >= 80.0


def test_int8_path_is_validated_against_fp32_on_held_out_images(manifest):
    q = manifest["quantization"]["int8_path"]
    assert q["images"] == 4 and q["check_set"] == "4 held-out dataset images"
    assert "training images of" in q["calibration"] and q["calibration"].startswith("8 ")
    assert q["thresholds"] == {"min_identical_pct": 95.0, "max_abs_bleu4_delta": 0.01}
    delta = q["bleu4_vs_references"]["other"] - q["bleu4_vs_references"]["fp32"]
    assert q["bleu4_delta_vs_references"] == pytest.approx(delta, abs=1e-4)
    assert q["validated"] == (q["identical_pct"] >= 95.0 and abs(delta) <= 0.01)
    assert f"{q['identical_pct']}% identical captions on 4 held-out images" in q["why"]


def test_int8_judge_applies_both_thresholds():
    def rec(pct, fp32, other):
        return {"identical_pct": pct, "images": 100, "bleu4_vs_references": {"fp32": fp32, "other": other}}

    assert parity.judge_int8(rec(96.0, 0.50, 0.495))[0]
    assert not parity.judge_int8(rec(94.0, 0.50, 0.50))[0]  # too many captions changed
    assert not parity.judge_int8(rec(99.0, 0.50, 0.48))[0]  # BLEU-4 moved by 0.02
    ok, why = parity.judge_int8({"identical_pct": 100.0, "images": 3})
    assert ok and "no reference captions" in why


def test_gemm_to_matmul_rewrite_is_exact():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="g")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    rewritten, n = quantize.gemm_to_matmul(onnx.ModelProto.FromString(model.SerializeToString()))
    assert n == 1 and [nd.op_type for nd in rewritten.graph.node] == ["MatMul", "Add"]
    x = rng.standard_normal((4, 3)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run(rewritten), run(model), rtol=1e-6, atol=1e-6)


class _Off:
    """An eager backend whose step is off by a constant: parity must flag it."""

    device = torch.device("cpu")

    def __init__(self, model, delta):
        self.model, self.delta = model, delta

    def encode(self, images):
        return self.model.encode(images)

    def step(self, *args):
        logprobs, h, c, alpha = self.model.step(*args)
        return logprobs + self.delta, h, c, alpha


def test_parity_report_flags_a_backend_beyond_tolerance(art):
    model, _ = model_from_checkpoint(art.checkpoint)
    images = torch.randn(8, 3, 64, 64)
    good = parity.parity_report(model, _Off(model, 0.0), images)
    assert good["failures"] == [] and good["worst"]["logprobs_max_abs"] == 0.0
    bad = parity.parity_report(model, _Off(model, 1e-2), images)
    assert len(bad["failures"]) == 9 and all("logprobs" in f for f in bad["failures"])
    assert bad["worst"]["logprobs_max_abs"] == pytest.approx(1e-2, rel=1e-3)


def test_export_script_fails_loudly_without_a_checkpoint(tmp_path, capsys):
    rc = to_onnx.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "checkpoint not found" in err and str(tmp_path / "nope.pt") in err
    assert not (tmp_path / "out").exists()


def test_export_script_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = to_onnx.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    staged = tmp_path / "staged"
    staged.mkdir()
    with pytest.raises(to_onnx.ExportError, match="refusing to replace"):
        to_onnx.publish(staged, target)
    assert (target / "thesis.tex").read_text() == "precious"


def test_export_model_rejects_a_mismatched_vocabulary(art, tmp_path):
    model, vocab = model_from_checkpoint(art.checkpoint)
    with pytest.raises(to_onnx.ExportError, match="vocabulary has"):
        to_onnx.export_model(model, Vocabulary(vocab.itos[4:-1]), tmp_path / "out")
    with pytest.raises(ValueError, match="quantize"):
        to_onnx.export_model(model, vocab, tmp_path / "out", quantize="int4")


def test_max_len_defaults_to_the_checkpoints_recorded_length():
    assert to_onnx.build_parser().parse_args([]).max_decode_len is None
    assert to_onnx.caption_max_len(None, {"decode": {"max_len": 51}}) == 51  # e.g. an imported tutorial model
    assert to_onnx.caption_max_len(None, {}) == fmt.DEFAULT_MAX_LEN == 20
    assert to_onnx.caption_max_len(7, {"decode": {"max_len": 51}}) == 7


def test_torchscript_only_when_asked():
    args = to_onnx.build_parser().parse_args
    assert args([]).torchscript is False
    assert args(["--torchscript"]).torchscript is True and args(["--no-torchscript"]).torchscript is False


def test_attention_energies_by_blocks_of_regions_are_exact(tmp_path):
    """The step computes its energies a block of regions at a time (cache-sized); the values are the plain
    formula's, bit for bit, in eager and in the exported graph."""
    import onnxruntime as ort

    from core.model import ENERGY_BLOCK, Attention
    from export.graphs import STEP_DYNAMIC, StepGraph, export_onnx_graph

    torch.manual_seed(0)
    att = Attention(encoder_dim=16, decoder_dim=8, attention_dim=512).eval()
    n, k, p = 3, 2, 196  # 196 regions of 512: blocks of 28
    assert p > ENERGY_BLOCK // 512
    enc_out, h = torch.randn(n, p, 16), torch.randn(n * k, 8)
    enc_att = att.encoder_att(enc_out)
    with torch.no_grad():
        awe, alpha = att.attend(enc_out, enc_att, h)
        dec = att.decoder_att(h).view(n, k, 1, 512)
        plain = torch.softmax(att.full_att(torch.relu(enc_att.unsqueeze(1) + dec)).squeeze(-1), -1).reshape(-1, p)
    assert torch.equal(alpha, plain)

    from core.model import CaptionModel, ModelConfig

    model = CaptionModel(ModelConfig(vocab_size=20, backbone="resnet18", image_size=32, encoded_size=14,
                                     attention_dim=512, embed_dim=8, decoder_dim=8)).eval()
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 3, 32, 32))
    args = (torch.tensor([1, 5, 7, 2]), enc.h.repeat_interleave(2, 0), enc.c.repeat_interleave(2, 0), enc.enc_out,
            enc.enc_att)
    path = tmp_path / "step.onnx"
    export_onnx_graph(StepGraph(model), args, path, fmt.STEP_INPUTS, fmt.STEP_OUTPUTS, STEP_DYNAMIC, 18, "M")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Relu") == 7  # one block of 28 regions each
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {name: t.numpy() for name, t in zip(fmt.STEP_INPUTS, args)})
    with torch.no_grad():
        ref = model.step(*args)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


def test_calibration_data_defaults_to_the_checkpoints_own_dataset(art, tmp_path, capsys):
    train = {"data": str(art.data_dir), "split_seed": 0, "val_frac": 0.1, "test_frac": 0.1}
    data, where = to_onnx.calibration_data(None, {"train_config": train})
    assert "the checkpoint's training data" in where and len(data.splits["train"]) == 32
    assert to_onnx.calibration_data(None, {"train_config": {**train, "data": str(tmp_path / "gone")}}) is None
    assert to_onnx.calibration_data(None, {}) is None
    # an explicit --calib-data that is not there is a clear error, not a traceback
    capsys.readouterr()
    rc = to_onnx.main(["--checkpoint", str(art.checkpoint), "--out", str(tmp_path / "out"), "--quantize", "int8",
                       "--calib-data", str(tmp_path / "nowhere"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "nowhere" in err and "Traceback" not in err
