"""The GPU check: every path of the toolkit that needs an NVIDIA GPU, in one command that ends within 8 minutes.

    ./launch.sh gpu-check [--work DIR] [--budget SECONDS]      # = python -m tools.gpu_check

With a CUDA GPU (core.hardware.detect()) it runs these checks in order, each step in its own subprocess with a
timeout, all of them inside one budget (default 460 s, so the command ends within 8 minutes):

  preflight    the modules the checks import are installed; ONNX Runtime's CUDA provider really starts a session
  gpu-tests    pytest tests -m gpu
  nccl         torchrun --nproc_per_node=1: a one-rank NCCL process group and an all_reduce
  data         python -m core.synthetic: 64 images of 64 px in the Flickr8k layout
  train        torchrun --nproc_per_node=1 distributed/train.py --preset tiny --loader dali --amp auto: DALI decodes
               on the GPU (device="mixed"), autocast bf16 or fp16 + GradScaler as core.hardware.choose_amp picks
  export       python export/to_onnx.py --fp16: the fp16 graphs must be written (they are skipped without CUDA)
  ort-parity   ONNX Runtime's CUDA provider (IO binding) vs eager PyTorch on the GPU: identical beam-3 captions,
               max |diff| of the step's logprobs; fp16 graphs' caption agreement reported
  bench        pytest bench -m gpu --bench-quick: the GPU rows of the benchmarks
  train-fp16   train again with --amp fp16 (GradScaler) where auto chose bf16; only when time is left

It prints a markdown table (check, status, seconds, detail), writes it with every step's log under the work
directory (default runs/gpu-check/<time>/), and exits 1 if a check failed, else 0.
Without a CUDA GPU nothing is checked: one line "gpu-check: SKIPPED: ..." and exit 0 (see docs/hardware.md, "GPU check").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script (python tools/gpu_check.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_BUDGET_S = 460.0  # all checks together; start-up and the table fit in the rest of 8 minutes
MIN_STEP_S = 15.0  # a step that cannot get this much time is not started
# What the checks import beyond torch; the GPU machine has no network, so a missing one means a wheel to bring.
MODULES = ("nvidia.dali", "onnxruntime", "onnx", "onnxscript", "nltk", "safetensors", "tqdm", "matplotlib",
           "PIL", "pytest", "pytest_benchmark")
LOGPROB_TOL = 1e-3  # ORT CUDA fp32 vs eager CUDA fp32 (TF32 off on both sides)
PARITY_IMAGES = 8


# --------------------------------------------------------------------------------------------- the aggregator
class CheckFailed(Exception):
    """A check ran and found something wrong (the message is the table's detail)."""


class Skipped(Exception):
    """A check did not run: what it needs is missing (an earlier check failed) or it is optional and out of time."""


@dataclass
class Result:
    name: str
    status: str  # ok | fail | skip
    seconds: float
    detail: str


def run_checks(checks: Sequence[tuple[str, Callable[[], str]]], log: Callable[[str], None] = print) -> list[Result]:
    """Run each check in order; one that fails or raises never stops the ones after it."""
    results = []
    for name, fn in checks:
        t0 = time.monotonic()
        try:
            status, detail = "ok", fn()
        except Skipped as e:
            status, detail = "skip", str(e)
        except CheckFailed as e:
            status, detail = "fail", str(e)
        except Exception as e:  # a bug in a check is a failure of the check, never the end of the run
            status, detail = "fail", f"{type(e).__name__}: {e}"
        results.append(Result(name, status, time.monotonic() - t0, " ".join(str(detail).split())))
        log(f"[gpu-check] {name}: {status} ({results[-1].seconds:.1f}s) {results[-1].detail}")
    return results


def exit_code(results: Sequence[Result]) -> int:
    """1 if any check failed, else 0 (a skip alone is not a failure: it follows a failure or is optional)."""
    return 1 if any(r.status == "fail" for r in results) else 0


def format_table(results: Sequence[Result]) -> str:
    rows = ["| check | status | seconds | detail |", "|---|---|---:|---|"]
    rows += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in results]
    total = sum(r.seconds for r in results)
    return "\n".join(rows + [f"| total | {'FAIL' if exit_code(results) else 'ok'} | {total:.1f} | |"])


# ---------------------------------------------------------------------------------------- running the steps
@dataclass
class Ctx:
    """Where the steps write, the time left, and what earlier checks produced for later ones."""

    work: Path
    deadline: float  # time.monotonic() value
    found: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, key: str, producer: str):
        if key not in self.found:
            raise Skipped(f"needs the {producer} check, which did not pass")
        return self.found[key]

    def run(self, name: str, cmd: list[str], cap_s: float, optional: bool = False) -> str:
        """Run cmd (cwd: the repository) within min(cap_s, time left); its output goes to logs/<name>.log."""
        timeout = min(cap_s, self.left())
        if timeout < MIN_STEP_S:
            msg = f"not started: {self.left():.0f}s left of the budget"
            raise Skipped(msg) if optional else CheckFailed(msg)
        log_path = self.work / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            # A session of its own: on timeout the whole group goes (torchrun's workers, DALI threads included).
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise CheckFailed(f"timed out after {timeout:.0f}s (log: {log_path})")
        text = log_path.read_text(errors="replace")
        if rc != 0:
            raise CheckFailed(f"exit {rc}: {failure_reason(text)} (log: {log_path})")
        return text


def last_line(text: str) -> str:
    """The last line of a log that says something (pytest's summary, an error), not a rule of "=====" ."""
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"\w", ln)]
    return lines[-1][:300] if lines else "(no output)"


def failure_reason(text: str) -> str:
    """The last Python exception line of a failed step (torchrun ends with its own ChildFailedError: skip that)."""
    errors = [ln.strip() for ln in text.splitlines()
              if re.match(r"\s*[\w.]*(Error|Exception|Exit)\b.*:", ln) and "ChildFailedError" not in ln]
    return errors[-1][:300] if errors else last_line(text)


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': 3, 'skipped': 1, ...} from pytest's last summary line."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last_line(text))}


# ------------------------------------------------------------------------------------------------ the checks
def check_preflight(ctx: Ctx, hw) -> str:
    """The modules are installed and ONNX Runtime's CUDA provider works (core.hardware probed it)."""
    import torch

    missing = [m for m in MODULES if _find_spec(m) is None]
    problems = [f"missing modules: {', '.join(missing)} (bring their wheels: docs/hardware.md, 'GPU check')"] if missing else []
    if not hw.ort_cuda:
        problems.append("ONNX Runtime CUDA provider does not work: " + "; ".join(hw.notes))
    if problems:
        raise CheckFailed("; ".join(problems))
    gpu = hw.gpus[0]
    return (f"{gpu.name} sm{gpu.capability[0]}{gpu.capability[1]} {gpu.memory_gib:.0f} GiB, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), ORT CUDA works")


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a missing parent package ("nvidia" for nvidia.dali)
        return None


def check_gpu_tests(ctx: Ctx) -> str:
    text = ctx.run("gpu-tests", [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rs",
                                 "-p", "no:cacheprovider"], cap_s=150)
    counts = pytest_counts(text)
    if not counts.get("passed"):  # with a GPU visible, tests that all skip checked nothing
        raise CheckFailed(f"no gpu test passed: {last_line(text)}")
    return last_line(text)


def check_nccl(ctx: Ctx) -> str:
    text = ctx.run("nccl", torchrun() + ["-m", "tools.gpu_check", "--worker", "nccl"], cap_s=60)
    return last_line(text)


def check_data(ctx: Ctx) -> str:
    data = ctx.work / "data"
    ctx.run("data", [sys.executable, "-m", "core.synthetic", str(data), "--images", "64", "--size", "64",
                     "--seed", "0"], cap_s=60)
    ctx.found["data"] = data
    return f"64 images of 64 px in {data}"


def train(ctx: Ctx, name: str, amp: str, optional: bool = False) -> str:
    """One torchrun training run on the GPU with the DALI loader; returns what it chose."""
    data = ctx.need("data", "data")
    out = ctx.work / name
    text = ctx.run(name, torchrun() + ["distributed/train.py", "--data", str(data), "--out", str(out),
                                       "--preset", "tiny", "--loader", "dali", "--amp", amp, "--no-progress"],
                   cap_s=150 if not optional else 120, optional=optional)
    chose = re.search(r"^amp (\w+): (.*)$", text, re.M)
    if "on cuda:0 | loader dali" not in text:
        raise CheckFailed(f"did not train on cuda:0 with the DALI loader (log: {ctx.work / 'logs' / name}.log)")
    if not chose or chose.group(1) not in ("bf16", "fp16"):
        raise CheckFailed(f"no GPU autocast: {chose.group(0) if chose else 'no amp line'}")
    if not (out / "best.pt").is_file():
        raise CheckFailed(f"no {out / 'best.pt'}")
    ctx.found[f"{name}.amp"] = chose.group(1)
    ctx.found[f"{name}.checkpoint"] = out / "best.pt"
    test = re.search(r"^test .*$", text, re.M)
    scaler = ", GradScaler" if chose.group(1) == "fp16" else ""
    return f"cuda:0, DALI mixed decode, {chose.group(1)}{scaler} ({chose.group(2)}); {test.group(0) if test else ''}"


def check_train(ctx: Ctx) -> str:
    return train(ctx, "train", "auto")


def check_train_fp16(ctx: Ctx) -> str:
    if ctx.need("train.amp", "train") == "fp16":
        raise Skipped("the train check already ran fp16 with GradScaler")
    return train(ctx, "train-fp16", "fp16", optional=True)


def check_export(ctx: Ctx) -> str:
    ckpt, data = ctx.need("train.checkpoint", "train"), ctx.need("data", "data")
    out = ctx.work / "exported"
    ctx.run("export", [sys.executable, "export/to_onnx.py", "--checkpoint", str(ckpt), "--out", str(out), "--fp16",
                       "--calib-data", str(data), "--calib-images", "16", "--beam-size", "3"], cap_s=150)
    manifest = json.loads((out / "manifest.json").read_text())
    fp16 = manifest.get("fp16") or {}
    if "skipped" in fp16 or not fp16:
        raise CheckFailed(f"fp16 graphs not exported: {fp16.get('skipped', 'no fp16 section in the manifest')}")
    ctx.found["export"] = out
    return f"fp32 + fp16 graphs in {out}; fp16 captions vs fp32: {json.dumps(fp16.get('captions'))[:160]}"


def check_ort_parity(ctx: Ctx) -> str:
    export, ckpt = ctx.need("export", "export"), ctx.need("train.checkpoint", "train")
    text = ctx.run("ort-parity", [sys.executable, "-m", "tools.gpu_check", "--worker", "parity", str(export),
                                  str(ckpt), str(ctx.need("data", "data"))], cap_s=90)
    r = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])  # warnings may follow it
    summary = (f"{r['providers'][0]} + IO binding vs eager cuda: {r['identical']}/{r['images']} beam-3 captions "
               f"identical, step logprobs max diff {r['logprob_max_diff']:.2e}, encoder rel diff "
               f"{r['encoder_rel_diff']:.2e}; fp16 graphs: {r['fp16_identical']}/{r['images']} identical")
    if r["identical"] != r["images"] or r["logprob_max_diff"] > LOGPROB_TOL or not r["io_binding"]:
        raise CheckFailed(summary)
    return summary


def check_bench(ctx: Ctx) -> str:
    json_path = ctx.work / "bench-gpu.json"
    text = ctx.run("bench", [sys.executable, "-m", "pytest", "bench", "-m", "gpu", "--bench-quick", "-q",
                             "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
                             "--benchmark-columns=median,rounds"], cap_s=150)
    if not pytest_counts(text).get("passed"):
        raise CheckFailed(f"no GPU benchmark ran: {last_line(text)}")
    return f"{last_line(text)}; medians in {json_path}"


# ------------------------------------------------------------------------- workers (run in the subprocesses)
def nccl_worker() -> None:
    """Under torchrun: a NCCL process group of one rank, an all_reduce on the GPU, a clean exit."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    backend, world = dist.get_backend(), dist.get_world_size()
    expected = world * (world + 1) / 2  # ranks 0..W-1 contributed 1..W
    ok = bool((x == expected).all())
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(f"all_reduce gave {x[0].item()}, expected {expected}")
    version = torch.cuda.nccl.version()
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    print(f"NCCL {version}: backend {backend}, all_reduce over {world} rank(s) on {device} ok")


def parity_worker(export_dir: str, checkpoint: str, data_dir: str, device: str = "cuda") -> None:
    """ORT CUDA (IO binding) vs eager CUDA on the same images; prints one JSON line.

    device="cpu" runs the same comparison on the CPU provider (no fp16): the tests rehearse this worker with it.
    """
    import torch

    from export.runtime import Captioner, EagerBackend, OrtBackend

    torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides (ORT runs with use_tf32=0)
    torch.backends.cuda.matmul.allow_tf32 = False
    ort = OrtBackend(export_dir, providers=[device])
    eager = EagerBackend.from_checkpoint(checkpoint, device)
    cap = Captioner(ort, beam_size=3)
    paths = sorted(p for p in (Path(data_dir) / "Images").iterdir() if p.is_file())[:PARITY_IMAGES]
    images = torch.stack([cap.load(p) for p in paths])  # on the CPU: each backend moves them where it runs
    enc_e, enc_o = eager.encode(images), ort.encode(images)
    words = torch.full((len(paths),), ort.vocab.start_id, dtype=torch.long, device=device)
    step_e = eager.step(words, enc_e.h, enc_e.c, enc_e.enc_out, enc_e.enc_att)
    step_o = ort.step(words, enc_e.h, enc_e.c, enc_e.enc_out, enc_e.enc_att)
    caps_e = Captioner(eager, beam_size=3).caption(images)
    caps_o = cap.caption(images)
    caps_16 = Captioner(OrtBackend(export_dir, providers=[device], fp16=True), beam_size=3).caption(images) \
        if device == "cuda" else []
    rel = (enc_o.enc_out - enc_e.enc_out).abs().max() / enc_e.enc_out.abs().max().clamp_min(1e-12)
    print(json.dumps({
        "providers": ort.providers, "images": len(paths),
        "io_binding": bool(ort.on_cuda and enc_o.enc_out.is_cuda and step_o[0].is_cuda),  # outputs stay on the GPU
        "identical": sum(a == b for a, b in zip(caps_e, caps_o)),
        "fp16_identical": sum(a == b for a, b in zip(caps_e, caps_16)),
        "logprob_max_diff": float((step_o[0] - step_e[0]).abs().max()), "encoder_rel_diff": float(rel),
        "captions": list(zip(caps_e, caps_o))[:3],
    }))


# ------------------------------------------------------------------------------------------------------ main
def gpu_checks(ctx: Ctx, hw) -> list[tuple[str, Callable[[], str]]]:
    return [
        ("preflight", lambda: check_preflight(ctx, hw)),
        ("gpu-tests", lambda: check_gpu_tests(ctx)),
        ("nccl", lambda: check_nccl(ctx)),
        ("data", lambda: check_data(ctx)),
        ("train", lambda: check_train(ctx)),
        ("export", lambda: check_export(ctx)),
        ("ort-parity", lambda: check_ort_parity(ctx)),
        ("bench", lambda: check_bench(ctx)),
        ("train-fp16", lambda: check_train_fp16(ctx)),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="where data, runs, exports and logs go "
                   "(default: runs/gpu-check/<time>)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for all checks together (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # the subprocess side: nccl | parity ARGS
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        {"nccl": nccl_worker, "parity": parity_worker}[args.worker[0]](*args.worker[1:])
        return 0
    from core import hardware  # the one place that detects the hardware

    hw = hardware.detect(ort=True)
    if not hw.cuda:
        print(f"gpu-check: SKIPPED: no CUDA GPU visible ({hardware.summary(hw)}); nothing was checked")
        return 0
    start = time.monotonic()
    work = args.work or ROOT / "runs" / "gpu-check" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    print(f"[gpu-check] {hardware.summary(hw)}; work dir {work}; budget {args.budget:.0f}s", flush=True)
    ctx = Ctx(work=work, deadline=start + args.budget)
    results = run_checks(gpu_checks(ctx, hw), log=lambda s: print(s, flush=True))
    table = format_table(results)
    (work / "summary.md").write_text(f"{hardware.summary(hw)}\n\n{table}\n")
    print(f"\n{table}\n\n[gpu-check] {'FAILED' if exit_code(results) else 'all checks passed'} "
          f"in {time.monotonic() - start:.0f}s; logs in {work / 'logs'}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
