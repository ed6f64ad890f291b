"""What this machine can really do, and the choices the toolkit makes from it: the one place that knows the hardware.

    python -m distributed.doctor          # (./launch.sh doctor) the table below, plus a real DALI run

Detection (``detect()``, cached): the CPU model, the kernel level ATen dispatches to
(``torch.backends.cpu.get_cpu_capability()``), whether oneDNN runs bf16 natively
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX-512 BF16 or AMX, and it honours ``ONEDNN_MAX_CPU_ISA``),
VNNI / AMX, the cores this process may use, each CUDA GPU with its compute capability and bf16 support, and whether
ONNX Runtime's CUDA provider really starts a session (the GPU build lists it even where no GPU exists).

Choices are pure functions of a :class:`Hardware` (tests build fake ones): training precision (``choose_amp``),
the int8 weight format (``choose_int8``), the caption precision (``choose_precision``), the captioning path (``choose_caption_path``) and the DALI decoder device
(``choose_dali_device``). Each returns a :class:`Choice` whose ``reason`` is logged in one line by the command that
uses it. Why it matters: without native bf16, bf16 autocast on a CPU is emulated and about 30x slower than fp32
(ResNet-18 forward measured on an AVX2-only AMD EPYC), and ONNX Runtime's u8s8 int8 kernels without VNNI use
VPMADDUBSW, whose 16-bit sums saturate with full-range int8 weights.
"""

from __future__ import annotations

import dataclasses
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


def _flags_within(flags: frozenset[str], capability: str) -> frozenset[str]:
    """The flags an older CPU of ``capability`` would have, where ATEN_CPU_CAPABILITY lowered it on purpose.

    That variable is how an AVX2-only machine is approximated on a newer one (ENVIRONMENT.md); ONNX Runtime's
    kernels read cpuid and ignore it, so without this the int8 choice (VNNI or not) would still be the new CPU's.
    Only an explicit setting drops flags: torch's own choice of AVX2 on an AVX-512 CPU says nothing of VNNI.
    """
    if not os.environ.get("ATEN_CPU_CAPABILITY") or capability.upper().startswith("AVX512"):
        return flags
    return frozenset(f for f in flags if not f.startswith(("avx512", "amx")))


def detect_cpu() -> CpuInfo:
    model, flags = _cpu_model_and_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    return CpuInfo(model=model, capability=capability, native_bf16=_native_bf16(),
                   flags=_flags_within(flags, capability), cores=cpu_cores())


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
    if not ort:
        return Hardware(cpu=detect_cpu(), gpus=detect_gpus())
    base = detect()  # the cached CPU and GPU probes, not run twice
    ort_cuda, why = probe_ort_cuda() if base.gpus else (False, "no CUDA GPU")
    return dataclasses.replace(base, ort_cuda=ort_cuda, notes=(f"ORT CUDA: {why}",) if why else ())


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


PRECISIONS = ("auto", "fp32", "int8", "bf16")


def choose_int8(hw: Hardware, portable: bool = False) -> Choice:
    """Weight range of int8 exports, from the instruction set of the exporting CPU.

    With VNNI (AVX512-VNNI, AVX-VNNI, AMX) ONNX Runtime's u8s8 kernels sum int8 products in 32 bits: full-range
    weights ("u8s8") are exact and the most accurate. Without VNNI the kernels use VPMADDUBSW, whose 16-bit pair
    sums saturate with full-range weights, so 7-bit weights ("reduce_range") are used. ``portable`` asks for 7-bit
    weights everywhere (a file made on a VNNI machine that must run on older CPUs). The runtime never picks a
    "u8s8" file by itself on a CPU without VNNI (``choose_precision``).
    """
    if portable:
        return Choice("reduce_range", "int8 weights in 7 bits (reduce_range, --int8-portable): exact on any x86 CPU")
    if hw.cpu.vnni:
        return Choice("u8s8", "full-range int8 weights (u8 activations x s8 weights): this CPU has VNNI, whose "
                              "32-bit int8 dot products do not saturate; CPUs without VNNI will not pick this file")
    return Choice("reduce_range", "int8 weights in 7 bits (reduce_range): this CPU has no VNNI, and VPMADDUBSW's "
                                  "16-bit sums saturate with full-range weights")


def int8_runs_natively(hw: Hardware, weight_format: str | None) -> tuple[bool, str]:
    """Whether an int8 file of ``weight_format`` computes exactly (no saturation) on this CPU, and why."""
    if weight_format == "reduce_range":
        return True, "7-bit int8 weights run exactly on any x86 CPU"
    if weight_format == "u8s8":
        return (True, "full-range int8 weights, and this CPU has VNNI") if hw.cpu.vnni else (
            False, "full-range int8 weights saturate without VNNI (this CPU has none)")
    return False, f"unknown int8 weight format {weight_format!r}"


def choose_precision(requested: str, hw: Hardware, int8: dict[str, Any] | None, device: str = "cpu") -> Choice:
    """Encoder/step precision of the ONNX Runtime caption path: fp32, int8 (int8 encoder + int8 step) or bf16.

    ``int8``: the export's int8 record, ``{"validated": bool, "weight_format": str, "why": str}`` (None: the export
    has no int8 encoder). auto takes int8 only where the export validated it against fp32 (caption agreement and
    BLEU-4) and this CPU runs its format natively; bf16 (an eager bf16 encoder) is never chosen by auto: the export
    does not validate it. Explicit requests are honoured, with a warning where they are slow or unvalidated.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {requested!r}")
    native, why_native = int8_runs_natively(hw, (int8 or {}).get("weight_format"))
    if requested == "fp32":
        return Choice("fp32", "--precision fp32")
    if requested == "bf16":
        warn = None if hw.cpu.native_bf16 or device == "cuda" else (
            f"--precision bf16 on a CPU without native bf16 ({hw.cpu.capability}): emulated, about 30x slower")
        return Choice("bf16", "--precision bf16: eager bf16 encoder, fp32 ONNX step", warning=warn)
    if requested == "int8":
        problems = [] if int8 else ["the export has no int8 encoder (export with --quantize int8)"]
        if int8 and not int8.get("validated"):
            problems.append(f"it did not pass the export's caption check ({int8.get('why', 'not validated')})")
        if int8 and not native:
            problems.append(why_native)
        return Choice("int8", "--precision int8", warning="; ".join(problems) or None)
    if device == "cuda":
        return Choice("fp32", "auto on CUDA: fp32 graphs (int8 graphs are CPU kernels)")
    if not int8:
        return Choice("fp32", "auto: the export has no int8 encoder (export with --quantize int8)")
    if not int8.get("validated"):
        return Choice("fp32", f"auto: the int8 path did not pass the export's caption check ({int8.get('why')})")
    if not native:
        return Choice("fp32", f"auto: {why_native}")
    return Choice("int8", f"auto: int8 encoder + int8 step, validated by the export ({int8.get('why')}); {why_native}")


def choose_caption_path(hw: Hardware, device: str = "auto") -> Choice:
    """ONNX Runtime provider and precision for captioning on this machine."""
    if device in ("auto", "cuda") and hw.ort_cuda:
        return Choice(("ort", "cuda", "fp32"), "ONNX Runtime CUDA provider, fp32 (IO binding)")
    reason = "ONNX Runtime CPU provider"
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
        ("-> --precision auto", "int8 encoder + step where the export validated them and their format runs here "
                                f"({'both weight formats: VNNI' if hw.cpu.vnni else '7-bit (reduce_range) files only: no VNNI'}), else fp32"),
        ("-> DALI decoder", choose_dali_device(hw, device).reason),
    ]
    rows += [("note", n) for n in hw.notes]
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
