"""core.hardware: the choices made from faked capabilities, the real detection, and ./launch.sh doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import hardware
from core.hardware import CpuInfo, GpuInfo, Hardware

ROOT = Path(__file__).resolve().parents[2]

AVX2_ONLY = Hardware(cpu=CpuInfo("AMD EPYC (Zen 3)", "AVX2", native_bf16=False, flags=frozenset({"avx2", "fma"}),
                                 cores=2))
AVX512_BF16 = Hardware(cpu=CpuInfo("AMD EPYC (Zen 5)", "AVX512", native_bf16=True,
                                   flags=frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), cores=2))
H100 = GpuInfo("NVIDIA H100", (9, 0), bf16=True, memory_gib=80)
V100 = GpuInfo("Tesla V100", (7, 0), bf16=False, memory_gib=16)


def test_cpu_without_native_bf16_trains_in_fp32():
    choice = hardware.choose_amp("auto", "cpu", AVX2_ONLY)
    assert choice.value is None and choice.warning is None
    assert "no native bf16" in choice.reason and "AVX2" in choice.reason


def test_cpu_with_native_bf16_trains_in_bf16():
    choice = hardware.choose_amp("auto", "cpu", AVX512_BF16)
    assert choice.value is torch.bfloat16 and choice.warning is None


def test_forced_bf16_on_a_cpu_without_it_warns_but_obeys():
    choice = hardware.choose_amp("bf16", "cpu", AVX2_ONLY)
    assert choice.value is torch.bfloat16
    assert choice.warning and "emulated" in choice.warning
    assert hardware.choose_amp("bf16", "cpu", AVX512_BF16).warning is None


@pytest.mark.parametrize("hw", [AVX2_ONLY, AVX512_BF16])
def test_off_is_fp32_and_fp16_on_cpu_warns(hw):
    assert hardware.choose_amp("off", "cpu", hw).value is None
    fp16 = hardware.choose_amp("fp16", "cpu", hw)
    assert fp16.value is torch.float16 and "slow" in fp16.warning
    with pytest.raises(ValueError, match="amp must be one of"):
        hardware.choose_amp("int4", "cpu", hw)


def test_cuda_bf16_where_the_gpu_has_it_else_fp16():
    ampere = Hardware(cpu=AVX2_ONLY.cpu, gpus=(H100,), ort_cuda=True)
    volta = Hardware(cpu=AVX512_BF16.cpu, gpus=(V100,))
    assert hardware.choose_amp("auto", "cuda", ampere).value is torch.bfloat16
    fp16 = hardware.choose_amp("auto", "cuda", volta)
    assert fp16.value is torch.float16 and "GradScaler" in fp16.reason
    assert hardware.choose_amp("bf16", "cuda", volta).warning  # emulated there too
    assert hardware.choose_amp("fp16", "cuda", ampere).value is torch.float16


def test_int8_format_follows_the_instruction_set():
    # VNNI sums int8 products in 32 bits: full-range weights; without it VPMADDUBSW saturates: 7-bit weights.
    assert hardware.choose_int8(AVX512_BF16).value == "u8s8"
    assert hardware.choose_int8(AVX2_ONLY).value == "reduce_range" and "no VNNI" in hardware.choose_int8(AVX2_ONLY).reason
    assert hardware.choose_int8(AVX512_BF16, portable=True).value == "reduce_range"
    assert AVX512_BF16.cpu.vnni and not AVX2_ONLY.cpu.vnni


VALID_U8S8 = {"validated": True, "weight_format": "u8s8", "why": "98% identical"}
VALID_7BIT = {"validated": True, "weight_format": "reduce_range", "why": "97% identical"}


def test_auto_precision_takes_int8_only_where_validated_and_native():
    assert hardware.choose_precision("auto", AVX512_BF16, VALID_U8S8).value == "int8"
    # a full-range file on a CPU without VNNI would saturate: fp32, saying why
    no_vnni = hardware.choose_precision("auto", AVX2_ONLY, VALID_U8S8)
    assert no_vnni.value == "fp32" and "without VNNI" in no_vnni.reason
    assert hardware.choose_precision("auto", AVX2_ONLY, VALID_7BIT).value == "int8"
    failed = hardware.choose_precision("auto", AVX512_BF16, {**VALID_U8S8, "validated": False, "why": "80% identical"})
    assert failed.value == "fp32" and "80% identical" in failed.reason
    assert hardware.choose_precision("auto", AVX512_BF16, None).value == "fp32"  # no int8 files
    assert hardware.choose_precision("auto", AVX512_BF16, VALID_U8S8, device="cuda").value == "fp32"
    assert hardware.choose_precision("auto", AVX512_BF16, VALID_U8S8).value != "bf16"  # bf16 is never validated


def test_explicit_precision_is_obeyed_with_warnings():
    forced = hardware.choose_precision("int8", AVX2_ONLY, {**VALID_U8S8, "validated": False, "why": "80%"})
    assert forced.value == "int8" and "80%" in forced.warning and "VNNI" in forced.warning
    assert hardware.choose_precision("int8", AVX512_BF16, VALID_U8S8).warning is None
    assert "no int8 encoder" in hardware.choose_precision("int8", AVX512_BF16, None).warning
    assert "emulated" in hardware.choose_precision("bf16", AVX2_ONLY, None).warning
    assert hardware.choose_precision("bf16", AVX512_BF16, None).warning is None
    assert hardware.choose_precision("fp32", AVX512_BF16, VALID_U8S8).value == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        hardware.choose_precision("int4", AVX512_BF16, None)


def test_caption_path_and_dali_device_follow_the_gpu():
    gpu_ok = Hardware(cpu=AVX2_ONLY.cpu, gpus=(H100,), ort_cuda=True)
    gpu_no_ort = Hardware(cpu=AVX2_ONLY.cpu, gpus=(H100,), ort_cuda=False)
    assert hardware.choose_caption_path(gpu_ok).value[1] == "cuda"
    assert hardware.choose_caption_path(gpu_ok, device="cpu").value[1] == "cpu"
    no_ort = hardware.choose_caption_path(gpu_no_ort)
    assert no_ort.value[1] == "cpu" and "does not start" in no_ort.reason
    assert hardware.choose_dali_device(gpu_ok, "cuda").value == "mixed"
    assert hardware.choose_dali_device(AVX2_ONLY, "cpu").value == "cpu"


def test_summary_and_tag_name_the_capability():
    assert hardware.capability_tag(AVX2_ONLY) == "AVX2"
    assert hardware.capability_tag(AVX512_BF16) == "AVX512+bf16+vnni"
    line = hardware.summary(Hardware(cpu=AVX2_ONLY.cpu, gpus=(V100,)))
    assert "AVX2" in line and "Tesla V100 (sm70)" in line
    rows = dict(hardware.table(AVX2_ONLY))
    assert rows["-> training precision"].startswith("fp32")
    assert dict(hardware.table(AVX512_BF16))["-> training precision"].startswith("bf16")


def test_detect_reads_this_machine():
    hw = hardware.detect()
    assert hw.cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert hw.cpu.cores >= 1
    assert hw.cpu.native_bf16 == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert hw.cuda == torch.cuda.is_available()


def _doctor(env_extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-m", "distributed.doctor", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_doctor_reports_and_chooses():
    rows = _doctor()
    assert rows["ATen kernel level"] == torch.backends.cpu.get_cpu_capability()
    want = "bf16" if hardware.detect().cpu.native_bf16 and not torch.cuda.is_available() else None
    if want:
        assert rows["-> training precision"].startswith(want)
    assert "DALI" in rows and "-> DALI decoder" in rows


def test_doctor_on_a_cpu_restricted_to_avx2_chooses_fp32():
    """oneDNN limited to AVX2 reports no native bf16, as on the older machines: the choice must follow."""
    rows = _doctor({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert rows["native bf16 (oneDNN)"].startswith("no")
    assert rows["ATen kernel level"] == "AVX2"
    # The approximation reaches the int8 choice too (ONNX Runtime reads cpuid, not these variables): the older
    # kind has no VNNI, so the export writes 7-bit weights and auto takes int8 only from such files.
    assert "avx512" not in rows["CPU flags"] and rows["VNNI / AMX"] == "no / no"
    assert rows["-> int8 export"].startswith("int8 weights in 7 bits")
    if not torch.cuda.is_available():
        assert rows["-> training precision"].startswith("fp32")
