"""What this machine can really do, and the choices the toolkit makes from it: the one place that knows the hardware.

    python -m distributed.doctor          # (./launch.sh doctor) the table below, plus a real DALI run

Detection (``detect()``, cached): the CPU model, the kernel level ATen dispatches to
(``torch.backends.cpu.get_cpu_capability()``), whether oneDNN runs bf16 natively
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX-512 BF16 or AMX, and it honours ``ONEDNN_MAX_CPU_ISA``),
VNNI / AMX, the cores this process may use, each CUDA GPU with its compute capability and bf16 support, and whether
ONNX Runtime's CUDA provider really starts a session (the GPU build lists it even where no GPU exists).

Choices are pure functions of a :class:`Hardware` (tests build fake ones): training precision (``choose_amp``),
the int8 weight format (``choose_int8``), the captioning path (``choose_caption_path``) and the DALI decoder device
(``choose_dali_device``). Each returns a :class:`Choice` whose ``reason`` is logged in one line by the command that
uses it. Why it matters: without native bf16, bf16 autocast on a CPU is emulated and about 30x slower than fp32
(ResNet-18 forward measured on an AVX2-only AMD EPYC), and ONNX Runtime's u8s8 int8 kernels without VNNI use
VPMADDUBSW, whose 16-bit sums saturate with full-range int8 weights.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# /proc/cpuinfo flags worth reporting: what decides precision and int8 kernels.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    capability: str  # ATen's kernel level: "DEFAULT", "AVX2", "AVX512" (lowered by ATEN_CPU_CAPABILITY)
    native_bf16: bool  # oneDNN runs bf16 without emulation (lowered by ONEDNN_MAX_CPU_ISA)
    flags: frozenset[str] = frozenset()
    cores: int = 1

    @property
    def vnni(self) -> bool:
        """int8 dot products without the 16-bit intermediate of VPMADDUBSW (AVX512-VNNI, AVX-VNNI or AMX)."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def amx(self) -> bool:
        return bool(self.flags & {"amx_bf16", "amx_int8"})


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: tuple[int, int]
    bf16: bool
    memory_gib: float


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = ()
    ort_cuda: bool = False  # an ONNX Runtime session really ran on CUDAExecutionProvider
    notes: tuple[str, ...] = field(default=())  # why a probe said no (shown by the doctor)

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str  # one line, logged by the command that made the choice
    warning: str | None = None  # set where the user forced something slow or unsafe on this hardware

    def __str__(self) -> str:
        return f"{self.value} ({self.reason})"


# ----------------------------------------------------------------------------------------------------- detection
def _cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:  # not Linux: the model from platform, no flags (the torch probes still decide)
        return platform.processor() or platform.machine(), frozenset()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    names = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.machine()), frozenset(names & set(_FLAGS))


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: bf16 would be the slow reference path
        return False


def detect_cpu() -> CpuInfo:
    model, flags = _cpu_model_and_flags()
    return CpuInfo(model=model, capability=torch.backends.cpu.get_cpu_capability(), native_bf16=_native_bf16(),
                   flags=flags, cores=cpu_cores())


def detect_gpus() -> tuple[GpuInfo, ...]:
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver reads as "no GPU", never a crash of the CPU path
        return ()
    gpus = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        gpus.append(GpuInfo(name=props.name, capability=cap, bf16=cap >= (8, 0), memory_gib=props.total_memory / 2**30))
    return tuple(gpus)


def probe_ort_cuda() -> tuple[bool, str]:
    """Run a one-node graph on ONNX Runtime's CUDA provider: (works, why not)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return False, f"onnxruntime does not import: {e}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    if not torch.cuda.is_available():
        return False, "ONNX Runtime lists the CUDA provider, but no CUDA GPU is visible"
    try:
        import numpy as np
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in sess.get_providers():
            return False, "a session asked for CUDA fell back to the CPU (CUDA/cuDNN libraries missing?)"
        sess.run(None, {"x": np.array([-1.0, 1.0], dtype=np.float32)})
        return True, ""
    except Exception as e:  # any failure to start is "does not work", with its reason
        return False, f"ONNX Runtime CUDA session failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


@functools.lru_cache(maxsize=2)
def detect(ort: bool = False) -> Hardware:
    """This machine. ``ort=True`` also starts an ONNX Runtime CUDA session where a GPU is visible (``ort_cuda``):
    only what captions through ONNX Runtime asks for it, so training and the eager path never import onnxruntime
    or open that session; without it ``ort_cuda`` is False."""
    gpus = detect_gpus()
    if not ort:
        return Hardware(cpu=detect_cpu(), gpus=gpus)
    ort_cuda, why = probe_ort_cuda() if gpus else (False, "no CUDA GPU")
    return Hardware(cpu=detect_cpu(), gpus=gpus, ort_cuda=ort_cuda, notes=(f"ORT CUDA: {why}",) if why else ())


# ------------------------------------------------------------------------------------------------------- choices
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def choose_amp(requested: str, device_type: str, hw: Hardware) -> Choice:
    """Autocast dtype for training/evaluation (``None`` = fp32).

    auto: on CUDA bf16 where the GPU has it (compute capability >= 8.0), else fp16 (with GradScaler); on a CPU bf16
    only where oneDNN runs it natively, else fp32. An explicit bf16 on a CPU without it is honoured with a warning.
    """
    if requested not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {list(AMP_CHOICES)}, got {requested!r}")
    if requested == "off":
        return Choice(None, "--amp off")
    if device_type == "cuda":
        gpu_bf16 = bool(hw.gpus) and all(g.bf16 for g in hw.gpus)
        if requested == "auto":
            return (Choice(torch.bfloat16, "the GPU supports bf16") if gpu_bf16 else
                    Choice(torch.float16, "the GPU has no bf16 (compute capability < 8.0); GradScaler on"))
        if requested == "bf16" and not gpu_bf16:
            return Choice(torch.bfloat16, "--amp bf16",
                          warning="--amp bf16 on a GPU without native bf16 (compute capability < 8.0) is slow")
        return Choice({"bf16": torch.bfloat16, "fp16": torch.float16}[requested], f"--amp {requested}")
    cpu = hw.cpu
    if requested == "fp16":  # honoured (it exercises the GradScaler path anywhere), but never chosen on a CPU
        return Choice(torch.float16, "--amp fp16", warning="--amp fp16 on a CPU is slow (no fp16 kernels); "
                                                           "use --amp auto, bf16 or off")
    if requested == "auto":
        if cpu.native_bf16:
            return Choice(torch.bfloat16, f"the CPU runs bf16 natively ({cpu.capability})")
        return Choice(None, f"the CPU has no native bf16 ({cpu.capability}): bf16 would be emulated, ~30x slower")
    if not cpu.native_bf16:
        return Choice(torch.bfloat16, "--amp bf16",
                      warning=f"--amp bf16 on a CPU without native bf16 ({cpu.capability}): emulated, about 30x slower "
                              "than fp32; use --amp auto or off")
    return Choice(torch.bfloat16, "--amp bf16 (native on this CPU)")


def dtype_name(dtype: torch.dtype | None) -> str:
    """'fp32' for no autocast, else 'bf16' / 'fp16'."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def choose_int8(hw: Hardware) -> Choice:
    """Weight range of int8 exports: 7-bit (``reduce_range``) wherever the file might run without VNNI.

    Without VNNI, ONNX Runtime's u8s8 kernels sum pairs of u8 x s8 products in 16 bits (VPMADDUBSW), which saturates
    with full-range weights and changes captions. An exported file can run on another machine than the one that made
    it, so the portable format is the default on every machine; the value is recorded in the manifest.
    """
    where = "this CPU has VNNI" if hw.cpu.vnni else "this CPU has no VNNI"
    return Choice("reduce_range", f"int8 weights in 7 bits (reduce_range): exact without VNNI, the file may run on "
                                  f"any x86 CPU ({where})")


def choose_caption_path(hw: Hardware, device: str = "auto") -> Choice:
    """ONNX Runtime provider and precision for captioning on this machine."""
    if device in ("auto", "cuda") and hw.ort_cuda:
        return Choice(("ort", "cuda", "fp32"), "ONNX Runtime CUDA provider, fp32 (IO binding)")
    reason = "ONNX Runtime CPU provider, fp32 encoder"
    if device == "auto" and hw.cuda and not hw.ort_cuda:
        reason += " (a GPU is visible but ONNX Runtime's CUDA provider does not start)"
    return Choice(("ort", "cpu", "fp32"), reason)


def choose_dali_device(hw: Hardware, device_type: str) -> Choice:
    if device_type == "cuda" and hw.cuda:
        return Choice("mixed", "DALI decodes JPEGs on the GPU (nvJPEG, device='mixed')")
    return Choice("cpu", "DALI decodes on the CPU (no GPU)")


# ------------------------------------------------------------------------------------------------------ reporting
def summary(hw: Hardware | None = None) -> str:
    """One line for logs: CPU, kernel level, bf16/VNNI/AMX, cores, GPUs."""
    hw = hw or detect()
    c = hw.cpu
    feats = _features(c)
    gpus = ", ".join(f"{g.name} (sm{g.capability[0]}{g.capability[1]})" for g in hw.gpus) or "no GPU"
    return f"{c.model} | {c.capability} {'+'.join(feats) or 'no bf16/vnni'} | {c.cores} cores | {gpus}"


def capability_tag(hw: Hardware | None = None) -> str:
    """Short tag naming the CPU kind a figure was measured on, e.g. 'AVX512+bf16+vnni' or 'AVX2'."""
    c = (hw or detect()).cpu
    return "+".join([c.capability] + _features(c))


def _features(c: CpuInfo) -> list[str]:
    return [name for name, on in (("bf16", c.native_bf16), ("vnni", c.vnni), ("amx", c.amx)) if on]


def table(hw: Hardware | None = None) -> list[tuple[str, str]]:
    """(item, value) rows for the doctor: what the machine has and what the toolkit will choose."""
    hw = hw or detect(ort=True)
    c = hw.cpu
    flags = " ".join(sorted(c.flags)) or "(not read: no /proc/cpuinfo)"
    rows = [
        ("CPU", c.model),
        ("ATen kernel level", c.capability),
        ("CPU flags", flags),
        ("native bf16 (oneDNN)", "yes" if c.native_bf16 else "no (bf16 would be emulated)"),
        ("VNNI / AMX", f"{'yes' if c.vnni else 'no'} / {'yes' if c.amx else 'no'}"),
        ("cores (affinity)", str(c.cores)),
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
    ]
    for i, g in enumerate(hw.gpus):
        rows.append((f"GPU {i}", f"{g.name}, sm{g.capability[0]}{g.capability[1]}, {g.memory_gib:.0f} GiB, "
                                 f"bf16 {'yes' if g.bf16 else 'no'}"))
    if not hw.gpus:
        rows.append(("GPU", "none visible"))
    rows.append(("ONNX Runtime CUDA", "works" if hw.ort_cuda else "no"))
    device = "cuda" if hw.cuda else "cpu"
    amp = choose_amp("auto", device, hw)
    rows += [
        ("-> training precision", f"{dtype_name(amp.value)}: {amp.reason}"),
        ("-> captioning path", choose_caption_path(hw).reason),
        ("-> int8 export", choose_int8(hw).reason),
        ("-> DALI decoder", choose_dali_device(hw, device).reason),
    ]
    rows += [("note", n) for n in hw.notes]
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
