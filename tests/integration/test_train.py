"""distributed/train.py in one process: config flags, train_one_epoch/evaluate in-process, checkpoint choice and
compatibility, bit-exact resume, NaN stop, a crash while writing a checkpoint. torchrun runs: test_train_distributed.py."""

from __future__ import annotations

import argparse
import sys
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from core.logs import setup_logging
from core.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from core.model import ModelConfig
from distributed.config import PRESETS, TrainConfig, add_dataclass_args, parse_config
from distributed.env import DistEnv
from distributed.loaders import EvalLoader, make_train_loader
from distributed.resume import Checkpointer, check_compatible
from distributed.eval_loop import evaluate, recompute_bn_stats
from distributed.optim import build_optimizer, build_scheduler
from distributed.train import Trainee, TrainState, build_model, load_data, main, train_one_epoch

CPU1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), is_main=True)


def tiny_cfg(data: Path, *flags: str) -> TrainConfig:
    return parse_config(["--data", str(data), "--preset", "tiny", *flags])


# ----------------------------------------------------------------------------------------------------------- config
def test_flags_are_generated_from_the_dataclass():
    @dataclass
    class Knobs:
        learning_rate: float = field(default=0.1, metadata={"help": "step size"})
        use_thing: bool = field(default=True, metadata={"help": "use it"})
        name: str | None = field(default=None, metadata={"help": "a name"})
        mode: str = field(default="a", metadata={"help": "mode", "choices": ["a", "b"]})

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Knobs)
    assert "step size" in p.format_help() and "--learning-rate" in p.format_help()
    a = p.parse_args(["--learning-rate", "0.5", "--no-use-thing", "--name", "x", "--mode", "b"])
    assert (a.learning_rate, a.use_thing, a.name, a.mode) == (0.5, False, "x", "b")
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_every_train_config_field_has_help_and_a_flag():
    help_text = argparse.ArgumentParser()
    add_dataclass_args(help_text, TrainConfig)
    text = help_text.format_help()
    for f in TrainConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f.name
        assert f.name == "model" or "--" + f.name.replace("_", "-") in text
    for f in ModelConfig.__dataclass_fields__.values():  # the nested model config: flat flags, vocab_size from data
        assert f.metadata.get("help"), f.name
        assert ("--" + f.name.replace("_", "-") in text) == (f.name != "vocab_size")


def test_preset_then_explicit_flags_win():
    cfg = parse_config(["--preset", "demo", "--batch-size", "16", "--no-hflip"])
    assert cfg.model.backbone == PRESETS["demo"]["model"]["backbone"] == "resnet18"
    assert cfg.model.image_size == 96 and cfg.model.encoded_size == 3 and cfg.encoder_weights == "none"
    assert parse_config(["--preset", "demo", "--image-size", "128"]).model.image_size == 128
    assert cfg.amp == "auto"  # the hardware decides (core.hardware.choose_amp)
    assert cfg.batch_size == 16
    assert cfg.train_encoder  # from scratch: the whole encoder trains
    assert parse_config([]).batch_size == 32 and not parse_config([]).train_encoder  # tutorial: frozen pretrained
    with pytest.raises(SystemExit):
        parse_config(["--amp", "fp8"])
    with pytest.raises(SystemExit):  # nonsense combination: a clear error, not a silent no-op
        parse_config(["--encoder-weights", "none", "--fine-tune-encoder"])


def test_no_preset_hard_codes_a_precision():
    # bf16 is ~30x slower than fp32 on CPUs without native bf16: only the hardware may choose it.
    for name, preset in PRESETS.items():
        assert "amp" not in preset, name


def test_the_demo_budget_is_a_number_of_steps():
    cfg = parse_config(["--preset", "demo"])
    assert cfg.max_steps > 0 and cfg.lr_schedule == "cosine"
    assert cfg.time_budget > 0  # only a safety cap
    with pytest.raises(SystemExit):
        parse_config(["--lr-schedule", "cosine"])  # decays to 0 at --max-steps: it needs one


def test_cosine_schedule_warms_up_then_decays_to_zero_at_max_steps():
    cfg = parse_config(["--preset", "tiny", "--lr-schedule", "cosine", "--max-steps", "20", "--warmup-steps", "4",
                        "--decoder-lr", "1e-3"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.decoder_lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)  # linear warm-up over 4 steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then monotone decay
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 at --max-steps
    plateau = build_scheduler(opt, parse_config(["--preset", "tiny"]))
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_config_json_is_saved_with_resolved_values(tmp_path):
    cfg = parse_config(["--preset", "tiny"])
    cfg.save(tmp_path / "config.json", amp_dtype="bf16", world_size=2)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["backbone"] == "resnet18" and saved["resolved"] == {"amp_dtype": "bf16", "world_size": 2}
    assert TrainConfig.from_dict(saved) == cfg


def test_unknown_config_keys_are_refused():
    saved = parse_config(["--preset", "tiny"]).to_dict()
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainConfig.from_dict({**saved, "colour": 3})
    flat = {k: v for k, v in saved.items() if k != "model"} | saved["model"]  # the layout before the model's fields were nested: no longer read
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainConfig.from_dict(flat)


# ------------------------------------------------------------------------------------------------ in-process loop
def test_train_one_epoch_and_evaluate_in_process(synthetic_data, one_thread, capsys):
    cfg = tiny_cfg(synthetic_data, "--max-steps", "2", "--amp", "bf16", "--log-every", "1")
    setup_logging("train", info_stream=sys.stdout)  # as main() does: info lines on stdout, problems on stderr
    data, vocab = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    optimizer = build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 2  # from scratch: decoder and the whole encoder
    train_table = data.caption_table("train", vocab)
    loader = make_train_loader("torch", data, train_table, cfg.model.image_size, cfg.batch_size, CPU1, cfg.seed, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = TrainState()
    saves = []
    trainee = Trainee(model, model, optimizer, build_scheduler(optimizer, cfg),
                      torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16))
    stats = train_one_epoch(trainee, loader, cfg, CPU1, state, save_last=lambda: saves.append(state.step))
    assert stats["stop"] == "max steps" and math.isfinite(stats["train_loss"]) and stats["samples_per_s"] > 0
    assert (state.step, state.batches_done, state.epoch) == (2, 2, 0) and state.train_seconds > 0
    out, err = capsys.readouterr()  # stderr is no terminal here: progress lines, no bar
    assert "step 1 | loss" in out and "step 2 | loss" in out and "batch/s" not in err and "it/s" not in err
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith("encoder"))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.startswith("decoder"))

    val_table = data.caption_table("val", vocab)
    val = EvalLoader(data, val_table, cfg.model.image_size, 2, CPU1, "torch", 0, "val")
    m = evaluate(model, val, val_table, vocab, nullcontext(), cfg, CPU1, beam_size=2)
    assert m["images"] == len(data.splits["val"]) == 5
    assert set(m["hypotheses"]) == set(range(5))
    assert math.isfinite(m["loss"]) and all(0 <= m[f"bleu{n}"] <= 1 for n in range(1, 5)) and m["cider"] >= 0

    class Twice:  # padded loaders repeat samples: they must count once
        def __iter__(self):
            yield from val
            yield from val

    m2 = evaluate(model, Twice(), val_table, vocab, nullcontext(), cfg, CPU1, beam_size=2)
    assert m2["images"] == 5 and m2["bleu4"] == m["bleu4"] and m2["loss"] == pytest.approx(m["loss"], rel=1e-6)


def test_precise_bn_replaces_lagging_running_statistics():
    from distributed.loaders import Batch

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    batches = [Batch(torch.randn(4, 3, 8, 8) * 3 + 2, None, None, None) for _ in range(3)]
    bn = encoder[1]
    assert recompute_bn_stats(encoder.eval(), batches, nullcontext())
    assert not encoder.training and bn.momentum == 0.1  # restored
    feats = torch.cat([encoder[0](b.images) for b in batches])
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not recompute_bn_stats(encoder, [], nullcontext())  # nothing to measure: left alone
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _tiny_checkpoint(synthetic_data, step: int, **model_changes):
    cfg = tiny_cfg(synthetic_data)
    cfg.model = replace(cfg.model, **model_changes)
    data, vocab = load_data(cfg)
    model = build_model(cfg, vocab)
    return cfg, vocab, model, make_checkpoint(model, vocab, step=step, train_config=cfg.to_dict(), world_size=1)


def test_resume_auto_skips_a_corrupt_checkpoint_and_picks_the_furthest(synthetic_data, tmp_path, capsys):
    _, _, _, older = _tiny_checkpoint(synthetic_data, step=3)
    save_checkpoint(tmp_path / "best.pt", older)
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 torn")  # newest file, but unreadable
    ckpt = Checkpointer(tmp_path, CPU1)
    assert ckpt.find("auto") == tmp_path / "best.pt"
    assert "skipping" in capsys.readouterr().err
    _, _, _, newer = _tiny_checkpoint(synthetic_data, step=5)
    save_checkpoint(tmp_path / "last.pt", newer)
    assert ckpt.find("auto") == tmp_path / "last.pt"
    assert ckpt.find("none") is None
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.find(str(tmp_path / "missing.pt"))
    assert Checkpointer(tmp_path / "empty", CPU1).find("auto") is None


def test_incompatible_checkpoint_says_what_differs(synthetic_data):
    _, _, _, saved = _tiny_checkpoint(synthetic_data, step=1, decoder_dim=48)
    cfg, vocab, model, _ = _tiny_checkpoint(synthetic_data, step=1)
    with pytest.raises(CheckpointError, match=r"decoder_dim: 48 \(checkpoint\) vs 32") as e:
        check_compatible(saved, cfg, model.cfg, vocab, Path("last.pt"), CPU1)
    assert "--resume none" in str(e.value)
    other_vocab = type(vocab)(vocab.itos[4:-1])  # one word fewer
    with pytest.raises(CheckpointError, match="vocabulary"):
        other = replace(cfg.model, vocab_size=len(other_vocab))
        check_compatible(saved | {"model_config": other.to_dict()}, cfg, other, other_vocab, Path("last.pt"), CPU1)


def test_missing_dataset_names_the_demo_and_the_layout(tmp_path, capsys, one_thread):
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "./launch.sh demo" in err and "Images/" in err and "Flickr8k.token.txt" in err


# -------------------------------------------------------------------------------------------- subprocess runs
def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained parameters (BatchNorm statistics are recomputed at every evaluation: not training state)."""
    return {k: v for k, v in load_checkpoint(path)["model"].items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_resume_mid_epoch_is_bit_exact(run_train, tmp_path):
    """7 steps straight == 3 steps, stop, resume, 4 more (38 images / batch 8 = 5 batches: both halves cross
    nothing or an epoch end, and the stop at step 3 is mid-epoch)."""
    flags = ["--loader", "torch", "--deterministic", "--epochs", "3", "--no-final-eval", "--val-max-images", "2"]
    straight = run_train(tmp_path / "a", *flags, "--max-steps", "7")
    assert straight.returncode == 0, straight.stderr
    first = run_train(tmp_path / "b", *flags, "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(tmp_path / "b" / "last.pt")["batches_done"] == 3
    second = run_train(tmp_path / "b", *flags, "--max-steps", "7")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "batch 3, step 3" in second.stdout
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 7
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_no_nan_checkpoint(run_train, tmp_path):
    out = tmp_path / "run"
    r = run_train(out, "--loader", "torch", "--amp", "bf16", "--save-every", "2", "--epochs", "2",
                  env={"FAULT_NAN_AT_STEP": "3"})
    assert r.returncode != 0
    assert "loss is nan at step 3" in r.stderr and "stopped before this update" in r.stderr
    assert "Traceback" not in r.stderr
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 2  # the step-2 save; nothing after the bad loss
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (out / "best.pt").exists() and not (out / "test_metrics.json").exists()


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(run_train, tmp_path):
    out = tmp_path / "run"
    flags = ["--loader", "torch", "--save-every", "2", "--epochs", "2", "--no-final-eval", "--val-max-images", "2"]
    crashed = run_train(out, *flags, env={"FAULT_CRASH_IN_SAVE": "2"})  # the step-4 write is torn
    assert crashed.returncode == 3 and "dying halfway" in crashed.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 2  # the previous checkpoint, intact
    assert list(out.glob(".last.pt.*.tmp"))  # the torn temporary is all that was lost
    resumed = run_train(out, *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last.pt'}" in resumed.stdout and "step 2," in resumed.stdout
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "last.pt")["step"] == 10  # 2 epochs of 5 batches


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_up_to_a_bound(run_train, tmp_path):
    # (fp16 matmuls are slow on a CPU: few, small steps)
    flags = ["--loader", "torch", "--amp", "fp16", "--batch-size", "4", "--max-steps", "2", "--no-final-eval",
             "--val-max-images", "1", "--precise-bn", "1"]
    ok = run_train(tmp_path / "a", *flags, env={"FAULT_NAN_AT_STEP": "2"})
    assert ok.returncode == 0, ok.stderr  # GradScaler skips the NaN step and lowers its scale
    saved = load_checkpoint(tmp_path / "a" / "last.pt")
    assert saved["step"] == 2 and saved["scaler"]["scale"] < 2.0**16
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    bad = run_train(tmp_path / "b", *flags, "--max-skipped-steps", "0", env={"FAULT_NAN_AT_STEP": "1"})
    assert bad.returncode == 1 and "consecutive fp16 steps overflowed" in bad.stderr
    assert not (tmp_path / "b" / "last.pt").exists()
