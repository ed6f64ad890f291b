"""export/runtime/load.py: ORT, TorchScript and eager give the same captions; input and file validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from tests.support.export_artifacts import artifacts, copy_export

from core.images import image_transform, load_image
from export import manifest as fmt
from export.runtime import (
    Captioner,
    EagerBackend,
    ExportFormatError,
    OrtBackend,
    TorchScriptBackend,
    load_backend,
    transform_for,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def backends(art):
    return {
        "ort": OrtBackend(art.export_dir, providers=["cpu"], threads=1),
        "torchscript": TorchScriptBackend(art.export_dir, device="cpu"),
        "eager": EagerBackend.from_checkpoint(art.checkpoint, device="cpu"),
    }


@pytest.fixture(scope="module")
def encodings(art, backends):
    """Each backend's encoding of the 8 held-out images, computed once."""
    return {name: b.encode(art.images) for name, b in backends.items()}


def _slice(enc, n):
    return type(enc)(*(t[:n] for t in enc))


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_backends_give_identical_beam_search_captions(backends, encodings, n, k):
    from core.decode import beam_search

    results = {}
    for name, b in backends.items():
        hyps = beam_search(_slice(encodings[name], n), b.step, k, 20, b.vocab.start_id, b.vocab.end_id)
        results[name] = hyps
    ref = results["eager"]
    words = [backends["eager"].vocab.decode(h.tokens) for h in ref]
    assert any(len(w.split()) >= 3 for w in words), words  # the trained model says something
    for name in ("ort", "torchscript"):
        assert [h.tokens for h in results[name]] == [h.tokens for h in ref], name
        for a, b in zip(results[name], ref):
            assert a.score == pytest.approx(b.score, abs=1e-3)
            torch.testing.assert_close(a.alphas, b.alphas, atol=1e-4, rtol=0)


def test_captioner_end_to_end_matches_across_backends(art, backends):
    caps = {name: Captioner(b, beam_size=3).caption(art.images[:3]) for name, b in backends.items()}
    assert caps["ort"] == caps["torchscript"] == caps["eager"]
    print("\n" + "\n".join(caps["ort"]))


def test_the_search_over_ort_on_cpu_runs_torch_on_one_thread(art, backends):
    """ORT computes in its own pool; torch's OpenMP workers, spinning after each small search op, would take its
    cores. The Captioner drops torch to one thread around encode + search and restores the caller's setting."""
    ort, eager = backends["ort"], backends["eager"]
    assert ort.search_threads == 1 and eager.search_threads is None
    seen = []

    class Watched:  # the real backend; its step notes torch's thread count
        def __getattr__(self, name):
            return getattr(ort, name)

        def step(self, *args):
            seen.append(torch.get_num_threads())
            return ort.step(*args)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert Captioner(Watched(), beam_size=3).caption(art.images[:2]) == Captioner(ort, beam_size=3).caption(
            art.images[:2])
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_captioner_decodes_a_large_jpeg_at_a_reduced_scale(art, backends, tmp_path):
    from PIL import Image

    from core.images import load_image_bytes

    size = backends["ort"].image_size
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8 * size, 10 * size, 3), dtype=np.uint8)).save(path)
    cap = Captioner(backends["ort"], beam_size=1)
    want = cap.transform(load_image_bytes(path.read_bytes(), reduce_for=size))
    assert torch.equal(cap.load(path), want)
    assert not torch.equal(want, cap.transform(load_image(path)))  # the full decode gives (slightly) other pixels


def test_step_outputs_within_tolerance(backends, encodings):
    n, k = 3, 5
    enc = _slice(encodings["eager"], n)
    g = torch.Generator().manual_seed(1)
    words = torch.randint(0, backends["eager"].vocab.__len__(), (n * k,), generator=g)
    h = enc.h.repeat_interleave(k, 0) + 0.1 * torch.randn(n * k, enc.h.shape[1], generator=g)
    c = enc.c.repeat_interleave(k, 0)
    ref = backends["eager"].step(words, h, c, enc.enc_out, enc.enc_att)
    for name in ("ort", "torchscript"):
        got = backends[name].step(words, h, c, enc.enc_out, enc.enc_att)
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in ref]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(encodings["ort"], encodings["eager"]):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_int8_step_runs_and_mostly_agrees(art, backends):
    int8 = OrtBackend(art.export_dir, providers=["cpu"], threads=1, int8=True)
    assert "int8" in int8.describe()
    fp32 = Captioner(backends["ort"], beam_size=3).caption(art.images)
    q = Captioner(int8, beam_size=3).caption(art.images)
    rate = 100.0 * sum(a == b for a, b in zip(fp32, q)) / len(q)
    print(f"\nint8 vs fp32 beam-3 captions identical on {len(q)} images: {rate:.0f}%")
    # The export's format follows its CPU (core.hardware.choose_int8): full-range weights with VNNI, 7-bit without
    # (7/8 on AVX2-only, where full-range weights saturated VPMADDUBSW's 16-bit sums and gave 3/8).
    assert rate >= 75.0


def test_int8_encoder_and_step_run_and_mostly_agree(art, backends):
    int8 = load_backend("ort", art.export_dir, providers=["cpu"], threads=1, precision="int8")
    assert int8.files == (fmt.ENCODER_INT8_ONNX, fmt.STEP_INT8_ONNX) and int8.precision.value == "int8"
    assert "int8 encoder + int8 step" in int8.describe()
    enc, ref = int8.encode(art.images), backends["ort"].encode(art.images)
    cos = torch.nn.functional.cosine_similarity(enc.enc_out.flatten(1), ref.enc_out.flatten(1)).min().item()
    same = torch.equal(enc.enc_out, ref.enc_out)
    fp32 = Captioner(backends["ort"], beam_size=3).caption(art.images)
    q = Captioner(int8, beam_size=3).caption(art.images)
    rate = 100.0 * sum(a == b for a, b in zip(fp32, q)) / len(q)
    print(f"\nint8 encoder: feature cosine >= {cos:.4f}; int8 encoder + step vs fp32 beam-3 captions identical on "
          f"{len(q)} images: {rate:.0f}%")
    assert not same and cos > 0.95  # quantized (not the fp32 graph), yet the same features


def _with_int8_record(art, tmp_path, **record):
    d = copy_export(art.export_dir, tmp_path / "exp")
    m = json.loads((d / fmt.MANIFEST).read_text())
    m["quantization"]["int8_path"].update(record)
    (d / fmt.MANIFEST).write_text(json.dumps(m))
    return d


def test_auto_precision_follows_the_export_validation(art, tmp_path):
    from core import hardware

    portable = _with_int8_record(art, tmp_path / "a", validated=True, weight_format="reduce_range", why="fine")
    b = load_backend("ort", portable, providers=["cpu"], threads=1, precision="auto")
    assert b.precision.value == "int8" and b.files[0] == fmt.ENCODER_INT8_ONNX and "fine" in b.precision.reason
    failed = _with_int8_record(art, tmp_path / "b", validated=False, why="50% identical captions")
    b = load_backend("ort", failed, providers=["cpu"], threads=1, precision="auto")
    assert b.precision.value == "fp32" and b.files == (fmt.ENCODER_ONNX, fmt.STEP_ONNX)
    assert "50% identical" in b.precision.reason
    full = _with_int8_record(art, tmp_path / "c", validated=True, weight_format="u8s8", why="fine")
    b = load_backend("ort", full, providers=["cpu"], threads=1, precision="auto")
    assert b.precision.value == ("int8" if hardware.detect().cpu.vnni else "fp32")
    # eager and TorchScript run fp32 under auto; int8 there is refused
    assert load_backend("eager", art.export_dir, device="cpu", precision="auto").precision.value == "fp32"
    with pytest.raises(ValueError, match="ONNX only"):
        load_backend("eager", art.export_dir, device="cpu", precision="int8")


def test_bf16_precision_is_an_eager_bf16_encoder_with_the_fp32_step(art, backends):
    b = load_backend("ort", art.export_dir, providers=["cpu"], threads=1, precision="bf16")
    assert b.precision.value == "bf16" and "eager bf16 encoder + ort" in b.describe()
    enc, ref = b.encode(art.images[:2]), backends["ort"].encode(art.images[:2])
    assert enc.enc_out.dtype == torch.float32 and enc.enc_out.is_contiguous()
    cos = torch.nn.functional.cosine_similarity(enc.enc_out.flatten(1), ref.enc_out.flatten(1)).min().item()
    assert cos > 0.99  # bf16 features, the same as fp32's up to rounding
    assert not torch.equal(enc.enc_out, ref.enc_out)  # bf16 rounding: not the fp32 encoder


def test_caption_paths_loads_ahead_in_a_thread_pool(art, backends):
    import threading

    class Recording(Captioner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.loaded, self.threads = [], set()

        def load(self, path):
            self.threads.add(threading.current_thread().name)
            out = super().load(path)
            self.loaded.append(str(path))
            return out

    paths = list(art.image_paths) * 2  # 16 files, batches of 2
    cap = Recording(backends["ort"], beam_size=1)
    it = cap.caption_paths(paths, batch_size=2, workers=3, prefetch=2)
    first = next(it)
    import time

    deadline = time.time() + 10
    while len(cap.loaded) < 6 and time.time() < deadline:  # 3 batches in flight: this one and 2 ahead
        time.sleep(0.01)
    assert first.ok and len(cap.loaded) == 6  # no more than prefetch batches ahead
    rest = list(it)
    assert [r.path for r in [first, *rest]] == [str(p) for p in paths]  # order kept
    assert all(t.startswith("caption-load") for t in cap.threads) and len(cap.threads) >= 2
    with pytest.raises(ValueError, match="prefetch"):
        next(cap.caption_paths(paths, prefetch=-1))


def test_eager_from_the_export_dir_equals_eager_from_the_checkpoint(art, backends, encodings):
    b = load_backend("eager", art.export_dir, device="cpu")
    assert isinstance(b, EagerBackend) and b.manifest is not None
    enc = b.encode(art.images[:2])
    torch.testing.assert_close(enc.enc_out, encodings["eager"].enc_out[:2])


def test_preprocessing_is_the_training_eval_transform(art, backends):
    cap = Captioner(backends["ort"], beam_size=1)
    ref = image_transform(64, train=False)
    for p in art.image_paths[:3]:
        torch.testing.assert_close(cap.load(p), ref(load_image(p)), atol=0, rtol=0)
    with pytest.raises(ExportFormatError, match="unsupported preprocessing: resize = crop"):
        transform_for({**backends["ort"].preprocess, "resize": "crop"})


def test_caption_paths_streams_in_order_and_reports_bad_files(art, backends, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a jpeg")
    missing = tmp_path / "gone.png"
    paths = [art.image_paths[0], bad, art.image_paths[1], missing, art.image_paths[2]]
    cap = Captioner(backends["ort"], beam_size=3)
    results = list(cap.caption_paths(paths, batch_size=2, keep_alphas=True))
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert str(bad) in results[1].error and str(missing) in results[3].error
    assert [r.caption for r in results if r.ok] == cap.caption(art.images[:3])  # batching does not change captions
    ok = results[0]
    assert ok.alphas.shape == (len(ok.words), 4) and json.loads(json.dumps(ok.to_json()))["caption"] == ok.caption


@pytest.mark.parametrize("name", ["ort", "torchscript", "eager"])
def test_wrong_image_tensors_are_refused_with_the_expected_shape(backends, name):
    b = backends[name]
    for bad in (torch.randn(2, 3, 32, 32), torch.randn(3, 64, 64), torch.randn(2, 1, 64, 64),
                torch.randn(0, 3, 64, 64), torch.randn(2, 3, 64, 64, dtype=torch.float64),
                torch.zeros(2, 3, 64, 64, dtype=torch.uint8), [[1.0]]):
        with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
            b.encode(bad)
    b.encode(np.zeros((1, 3, 64, 64), dtype=np.float32))  # numpy float32 is accepted


def test_session_options_and_providers(art, backends):
    ort_b = backends["ort"]
    assert ort_b.providers == ["CPUExecutionProvider"] and ort_b.device == torch.device("cpu")
    opts = ort_b.step_sess.get_session_options()
    import onnxruntime as ort

    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.intra_op_num_threads == 1
    for sess in (ort_b.encoder_sess, ort_b.step_sess):  # two pools used in turns: neither spins while idle
        assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider requested"):
            OrtBackend(art.export_dir, providers=["cuda"])
        with pytest.raises(RuntimeError, match="fp16|CUDA"):
            OrtBackend(art.export_dir, fp16=True)
    with pytest.raises(RuntimeError, match="provider"):
        OrtBackend(art.export_dir, providers=["NoSuchExecutionProvider"])


def test_cpu_inputs_are_fed_as_numpy_views_without_copies(backends, encodings):
    b = backends["ort"]
    seen = {}
    real = b.step_sess

    class Spy:
        def run(self, names, feeds):
            seen.update(feeds)
            return real.run(names, feeds)

    enc = _slice(encodings["ort"], 2)
    h = enc.h.repeat_interleave(3, 0).contiguous()
    b.step_sess = Spy()
    try:
        b.step(torch.ones(6, dtype=torch.long), h, h.clone(), enc.enc_out, enc.enc_att)
    finally:
        b.step_sess = real
    assert np.shares_memory(seen["h"], h.numpy()) and np.shares_memory(seen["enc_out"], enc.enc_out.numpy())


# ------------------------------------------------------------------------------------- damaged export dirs
@pytest.fixture
def damaged(art, tmp_path):
    return copy_export(art.export_dir, tmp_path / "exported")


def _rehash(d, name):
    m = json.loads((d / fmt.MANIFEST).read_text())
    m["files"][name]["sha256"] = fmt.sha256_file(d / name)
    (d / fmt.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("name", [fmt.ENCODER_ONNX, fmt.STEP_ONNX, fmt.VOCAB])
def test_missing_model_file_is_named(damaged, name):
    (damaged / name).unlink()
    with pytest.raises(ExportFormatError, match=rf"missing.*{name}"):
        OrtBackend(damaged, providers=["cpu"])


def test_missing_manifest_or_dir(damaged, tmp_path):
    with pytest.raises(ExportFormatError, match="export directory not found"):
        OrtBackend(tmp_path / "nowhere")
    (damaged / fmt.MANIFEST).unlink()
    with pytest.raises(ExportFormatError, match="no manifest.json"):
        OrtBackend(damaged)


def test_corrupt_manifest_is_named(damaged):
    (damaged / fmt.MANIFEST).write_text("{not json")
    with pytest.raises(ExportFormatError, match="manifest.json is not valid JSON"):
        TorchScriptBackend(damaged)


@pytest.mark.parametrize("name", [fmt.ENCODER_ONNX, fmt.STEP_TS])
def test_corrupt_model_file_is_named(damaged, name):
    (damaged / name).write_bytes(b"\x08\x07garbage" * 100)
    _rehash(damaged, name)  # a file that matches its hash but is not a model (e.g. corrupt at export time)
    cls = OrtBackend if name.endswith(".onnx") else TorchScriptBackend
    with pytest.raises(ExportFormatError, match=name):
        cls(damaged)


@pytest.mark.parametrize("name", [fmt.STEP_ONNX, fmt.ENCODER_TS, fmt.VOCAB, fmt.SAFETENSORS])
def test_tampered_file_is_refused(damaged, name):
    data = bytearray((damaged / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (damaged / name).write_bytes(bytes(data))
    backend = {fmt.STEP_ONNX: "ort", fmt.ENCODER_TS: "torchscript", fmt.VOCAB: "ort", fmt.SAFETENSORS: "eager"}[name]
    with pytest.raises(ExportFormatError, match=rf"{name}: sha256 .* does not match"):
        load_backend(backend, damaged, device="cpu")


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/abs_outside.bin", "sub/../../outside.bin"])
def test_external_data_outside_the_export_dir_is_refused(damaged, location, tmp_path):
    """A model whose weights point outside its directory (here at a real file ORT would read) is refused."""
    from onnx import numpy_helper

    model = onnx.load(str(damaged / fmt.STEP_ONNX))
    tensor = next(t for t in model.graph.initializer if t.name.endswith("fc.weight"))
    raw = numpy_helper.to_array(tensor).tobytes()
    target = (damaged / location) if not location.startswith("/") else tmp_path / "abs_outside.bin"
    if location.startswith("/"):
        location = str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (damaged / fmt.STEP_ONNX).write_bytes(model.SerializeToString())
    _rehash(damaged, fmt.STEP_ONNX)
    with pytest.raises(ExportFormatError, match="outside the export directory"):
        OrtBackend(damaged, providers=["cpu"])


def test_external_data_inside_the_dir_is_allowed_when_listed(damaged):
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(damaged / fmt.STEP_ONNX))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="step.data", size_threshold=1024)
    onnx.save(model, str(damaged / fmt.STEP_ONNX))
    _rehash(damaged, fmt.STEP_ONNX)
    with pytest.raises(ExportFormatError, match="step.data.*not listed"):
        OrtBackend(damaged, providers=["cpu"])
    m = json.loads((damaged / fmt.MANIFEST).read_text())
    m["files"]["step.data"] = {"sha256": fmt.sha256_file(damaged / "step.data")}
    (damaged / fmt.MANIFEST).write_text(json.dumps(m))
    b = OrtBackend(damaged, providers=["cpu"])
    assert Captioner(b, beam_size=1).caption(torch.zeros(1, 3, 64, 64))


def test_unlisted_or_escaping_manifest_entries_are_refused(damaged):
    m = json.loads((damaged / fmt.MANIFEST).read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0"}
    (damaged / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ExportFormatError, match="outside the export directory"):
        OrtBackend(damaged)


def test_eager_backend_needs_a_checkpoint_or_weights(tmp_path):
    with pytest.raises(ExportFormatError, match="checkpoint .pt file or an export directory"):
        load_backend("eager", tmp_path)
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("tensorrt", tmp_path)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_cuda
def test_cuda_provider_with_io_binding_matches_cpu(art, backends):
    gpu = OrtBackend(art.export_dir, providers=["cuda"])
    assert gpu.on_cuda and gpu.providers[0] == "CUDAExecutionProvider"
    enc = gpu.encode(art.images.cuda())
    assert enc.enc_out.is_cuda
    out = gpu.step(torch.ones(8, dtype=torch.long, device="cuda"), enc.h, enc.c, enc.enc_out, enc.enc_att)
    assert all(t.is_cuda for t in out)
    cpu_caps = Captioner(backends["ort"], beam_size=3).caption(art.images)
    assert Captioner(gpu, beam_size=3).caption(art.images) == cpu_caps


@pytest.mark.gpu
@needs_cuda
def test_cuda_torchscript_and_eager_match_cpu(art, backends, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs, as on the CPU
    cpu_caps = Captioner(backends["eager"], beam_size=3).caption(art.images)
    for b in (TorchScriptBackend(art.export_dir, device="cuda"), EagerBackend.from_checkpoint(art.checkpoint, "cuda")):
        assert Captioner(b, beam_size=3).caption(art.images) == cpu_caps


@pytest.mark.gpu
@needs_cuda
def test_fp16_graphs_when_exported_on_cuda(art):
    manifest = json.loads((art.export_dir / fmt.MANIFEST).read_text())
    assert fmt.STEP_FP16_ONNX in manifest["files"], manifest.get("fp16")
    b = OrtBackend(art.export_dir, providers=["cuda"], fp16=True)
    caps = Captioner(b, beam_size=3).caption(art.images)
    assert len(caps) == len(art.images)
    print("\nfp16 agreement:", manifest["fp16"].get("captions"))


def test_caption_command_precision_flag(art, capsys):
    from export.runtime import caption

    rc = caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "--precision", "int8", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0 and "precision int8 (--precision int8)" in out.err and "int8 encoder + int8 step" in out.err
    rc = caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "--threads", "1"])  # auto
    err = capsys.readouterr().err
    assert rc == 0 and "precision " in err and "auto" in err
    with pytest.raises(SystemExit) as e:
        caption.main([str(art.image_paths[0]), "--model", str(art.export_dir), "--precision", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
