"""Run the benchmark suite and write a report: medians, ratios against the tutorial reference, targets, chart.

    python bench/report.py                 # full suite, real shapes, within --budget-min (default 10 minutes)
    python bench/report.py --quick         # CI smoke: small shapes, one round each (well under a minute)
    ./launch.sh bench [--quick]            # the same through the launcher
    python bench/report.py --groups step,beam          # only some families (encoder, step, caption, beam, train)
    python bench/report.py --budget-min 30             # more time: every row on a slow machine
    python bench/report.py --from-results  # re-render the newest run without re-running (a killed run too)
    python bench/report.py -- -k ort       # anything after -- goes to pytest

Writes into bench/results/ (git-ignored; --out DIR elsewhere): bench-<time>[-quick].jsonl, one line per result
appended as each benchmark ends (bench/results.py), then report.md and report.png from whatever it holds. The
benchmarks run in bench/plan.py's order (the targets' rows first); one that would not end within the budget is
recorded as "not run: budget", and bf16 rows are not run on a CPU without native bf16. Exit status: pytest's (a
caption mismatch between fp32 backends fails the run); with --strict also 3 when a target is missed.

Targets (CPU, full shapes, medians of one run, ratios against the reference):
    end to end 1 image beam 5: ORT >= 3x faster       end to end 32 images: ORT throughput >= 5x
    beam search alone 32 x 5:  ORT >= 12x faster      decoder step 1 x 5: ORT fp32 within 2x of the memory floor
    decoder step: ORT int8 >= 1.5x faster than fp32   exported fp32 captions identical to eager fp32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/report.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results
from bench.rows import BACKEND_LABEL, fmt_ms, group_rows, label, load_rows, row_order
from bench.targets import evaluate_targets

ROOT = Path(__file__).resolve().parents[1]

BENCH = ROOT / "bench"
DEFAULT_BUDGET_MIN = 10.0  # start-up included: it ends within 12 minutes, on the AVX2-only kind too
TRAIN_FILE = BENCH / "test_bench_train.py"  # the training benchmarks (owned by the training code's authors)
FAMILIES = {"encoder": "bench_encoder", "step": "bench_step", "caption": "bench_caption", "beam": "bench_beam",
            "train": "bench_train"}


# ------------------------------------------------------------------------------------------------ running
def run_pytest(args: argparse.Namespace, results_path: Path, deadline: float) -> int:
    """Run the suite in a child pytest; it appends each result to results_path as it ends (bench/conftest.py)."""
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH), "-p", "no:cacheprovider", "-q",
        "--benchmark-group-by=group", "--benchmark-sort=name", "--benchmark-columns=median,min,max,rounds",
    ]
    marks = []
    if args.groups:
        marks.append("(" + " or ".join(FAMILIES[g] for g in args.groups) + ")")
    if args.cpu_only:
        marks.append("not gpu")
    if marks:
        cmd += ["-m", " and ".join(marks)]
    # The training benchmarks take seconds: part of the full run, left out of the quick one (CI smoke budget).
    with_train = args.train or (args.groups and "train" in args.groups) or not (args.quick or args.no_train)
    if not with_train and TRAIN_FILE.exists():
        cmd += [f"--ignore={TRAIN_FILE}"]
    cmd += args.pytest_args
    env = dict(os.environ)
    env["SAT_BENCH_QUICK"] = "1" if args.quick else "0"
    env["SAT_BENCH_RESULTS"] = str(results_path)
    env["SAT_BENCH_DEADLINE"] = str(deadline)
    if args.threads:
        env["SAT_BENCH_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    print("[bench] " + " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, cwd=ROOT, env=env)
    except KeyboardInterrupt:  # the child got the same signal; render what it measured
        print("[bench] interrupted: the report shows what was measured", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------- tables
def group_table(rs: list[dict]) -> list[str]:
    ref = next((r for r in rs if r["backend"] == "reference"), None)
    base_label = "vs reference" if ref else "vs fastest"
    base = ref["median_ms"] if ref else min(r["median_ms"] for r in rs)
    kind = rs[0]["kind"] or ""
    images = rs[0]["info"].get("images")
    lines = [f"| backend | median | min | rounds | {base_label} |" + (" images/s |" if kind.startswith(("caption", "beam", "encoder")) and images else "")
             + " notes |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for r in rs:
        ratio = base / r["median_ms"]
        if kind == "train_tutorial":  # calls differ in captions: the ratio is of captions/s
            rel = "1.00x (baseline)" if r["backend"] == "tutorial" else f"{r['info'].get('vs_tutorial', '?')}x captions/s"
        elif r is ref:
            rel = "1.00x (baseline)"
        elif ref is None and r["median_ms"] == base:
            rel = "1.00x (fastest)"
        else:
            rel = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        cells = [label(r), fmt_ms(r["median_ms"]), fmt_ms(r["min_ms"]), str(r["rounds"]), rel]
        if kind.startswith(("caption", "beam", "encoder")) and images:
            cells.append(f"{images / (r['median_ms'] / 1e3):.1f}")
        cells.append(row_notes(r))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def row_notes(r: dict) -> str:
    info, notes = r["info"], []
    if r["rounds"] > 1 and r["median_ms"] > 1.5 * r["min_ms"]:
        notes.append(f"**noisy**: median {r['median_ms'] / r['min_ms']:.1f}x the fastest round")
    if "floor_ms" in info:
        notes.append(f"{r['median_ms'] / info['floor_ms']:.1f}x the memory floor ({fmt_ms(info['floor_ms'])})")
    if "compute_floor_ms" in info:
        per = info["compute_floor_ms"] / max(1, info.get("images", 1))
        notes.append(f"{r['median_ms'] / info['compute_floor_ms']:.1f}x the compute floor ({fmt_ms(per)}/image: "
                     f"{info['encoder_macs_per_image'] / 1e9:.2f} GMACs at a measured peak of {info['peak_GFLOPs']:.0f} G(FL)OP/s)")
    if "caption_agreement_vs_eager" in info:
        notes.append(f"captions = eager fp32: {info['caption_agreement_vs_eager']:.0%}"
                     + (f" (words: {info['token_agreement_vs_eager']:.0%})" if "token_agreement_vs_eager" in info else ""))
    if "captions_per_s" in info:  # training vs the tutorial
        notes.append(f"{info['captions_per_s']} captions/s" + (f", {info['vs_tutorial']}x the tutorial's"
                                                              if "vs_tutorial" in info else ""))
        notes.append(f"{r['median_ms'] / info['train_floor_ms']:.1f}x the FLOP floor ({fmt_ms(info['train_floor_ms'])}: "
                     f"{info['flops_per_caption'] / 1e9:.2f} GFLOP/caption at {info['peak_GFLOPs']:.0f} GFLOP/s)")
        if "cache_build_s" in info:
            notes.append(f"cache built beforehand in {info['cache_build_s']} s")
    for key, unit in (("samples_per_s", "samples/s"), ("images_per_s", "images/s")):  # the training benchmarks
        if key in info:
            notes.append(f"{info[key]} {unit}")
    if "reference_rows_per_image" in info:
        notes.append(f"ran {info['reference_steps_per_image']:.1f} steps, {info['reference_rows_per_image']:.0f} beam-rows "
                     f"per image (fixed search: {info['fixed_rows_per_image']})")
    if "top1_agreement_vs_eager" in info and r["backend"] != "eager":
        notes.append(f"top-1 word = eager: {info['top1_agreement_vs_eager']:.0%}, max |dlogp| {info['max_abs_diff_logprobs_vs_eager']:.1e}")
    return "; ".join(notes)


# ------------------------------------------------------------------------------------------------- chart
def write_chart(rows: list[dict], path: Path, device: str = "cpu") -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    groups = {g: rs for g, rs in group_rows(rows).items() if rs[0]["device"] == device}
    if not groups:
        return False
    fig = Figure(figsize=(10, 2.2 + 1.6 * len(groups)))
    FigureCanvasAgg(fig)
    for i, (group, rs) in enumerate(groups.items()):
        ax = fig.add_subplot(len(groups), 1, i + 1)
        labels = [label(r) for r in rs]
        values = [r["median_ms"] for r in rs]
        colors = ["#888888" if r["backend"] == "reference" else "#1f77b4" if r["backend"].startswith("ort") else "#ff7f0e"
                  for r in rs]
        y = range(len(rs))
        ax.barh(list(y), values, color=colors)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(group, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ref = next((r for r in rs if r["backend"] == "reference"), None)
        for j, r in enumerate(rs):
            text = fmt_ms(r["median_ms"])
            if ref and r is not ref:
                text += f"  ({ref['median_ms'] / r['median_ms']:.1f}x)"
            ax.text(r["median_ms"], j, " " + text, va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.35)
    fig.supxlabel("median time per call (ms); (Nx) = speedup over the tutorial reference", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ------------------------------------------------------------------------------------------------ report
def machine_section(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    ours = mi.get("sat_bench", {})
    cfg = ours.get("config", {})
    lines = ["## Machine and configuration", ""]
    items = [
        ("CPU", f"{ours.get('cpu_model', mi.get('cpu', {}).get('brand_raw', '?'))}, {ours.get('cpu_cores', '?')} cores, "
                f"kernels **{cpu_tag(data)}**" + (f" ({', '.join(ours['cpu_flags'])})" if ours.get("cpu_flags") else "")),
        ("GPU", ours.get("gpu", "none")),
        ("software", f"Python {ours.get('python', mi.get('python_version', '?'))}, torch {ours.get('torch', '?')}, "
                     f"onnxruntime {ours.get('onnxruntime', '?')}, numpy {ours.get('numpy', '?')}"),
        ("threads", f"{cfg.get('num_threads', '?')} intra-op threads (torch and ONNX Runtime)"),
        ("load average at the end (1/5/15 min)", ", ".join(map(str, ours.get("loadavg_1_5_15", []))) or "?"),
        ("shapes", f"{cfg.get('backbone')} at {cfg.get('image_size')} px -> {cfg.get('encoded_size')}x{cfg.get('encoded_size')} "
                   f"regions; attention/embedding/decoder {cfg.get('attention_dim')}/{cfg.get('embed_dim')}/{cfg.get('decoder_dim')}; "
                   f"vocabulary {cfg.get('vocab_size')}; beam {cfg.get('beam_size')}; {cfg.get('max_len')} steps"
                   + (" (QUICK mode: small shapes, single rounds, speed not judged)" if cfg.get("quick") else "")),
        ("started", f"{data.get('datetime', '?')}"),
    ]
    bw = _bandwidth(data)
    if bw:
        items.append(("memory bandwidth (this run)", f"{bw['bandwidth_GBps']:.1f} GB/s ({bw['copy_MB']:.0f} MB copy; "
                                                     f"torch {bw['bandwidth_torch_GBps']:.1f}, numpy {bw['bandwidth_numpy_GBps']:.1f} GB/s)"))
    load = ours.get("loadavg_1_5_15") or [0]
    cores = ours.get("cpu_cores") or 1
    lines += [f"- **{k}**: {v}" for k, v in items]
    if load and load[0] > 0.5 * cores:
        lines += ["", f"> The 1-minute load average ({load[0]}) was high for {cores} cores: other processes shared "
                      "the CPU during this run, so times are pessimistic and noisy. Contention hurts PyTorch's "
                      "OpenMP threads (the reference, eager, TorchScript: many small parallel regions, each waiting "
                      "for a preempted thread) far more than ONNX Runtime's pool, which inflates ratios against the "
                      "reference; rows marked noisy had rounds far slower than their fastest."]
    return lines + [""]


def cpu_tag(data: dict) -> str:
    """The capability tag of the CPU the run measured on (core.hardware.capability_tag), e.g. 'AVX2'."""
    return data.get("run", {}).get("capability") or data.get("machine_info", {}).get("sat_bench", {}).get("capability", "?")


def not_run_section(data: dict) -> list[str]:
    """Rows left out (budget, no native bf16, cut short) and failures: listed, never silently dropped."""
    gpu = [r for r in data["not_run"] if r["name"].startswith(("test_train_step_gpu", "test_loader_gpu")) or "[cuda-" in r["name"]]
    cpu = [r for r in data["not_run"] if r not in gpu]
    lines = []
    if data.get("end") is None:
        lines += [f"> **This run was cut short** (no end record): {len(data['benchmarks'])} benchmarks were measured "
                  "before it stopped; the rest are listed below as not run.", ""]
    if cpu or data["failed"]:
        lines += ["## Not run or failed", "", "| benchmark | group | why |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r.get('group') or '-'} | {r['reason']} |" for r in cpu]
        lines += [f"| {r['name']} | {r.get('group') or '-'} | **failed**: {r['reason']} |" for r in data["failed"]]
        lines.append("")
    if gpu:
        lines += [f"{len(gpu)} GPU rows not run ({gpu[0]['reason']}).", ""]
    return lines


def _bandwidth(data: dict) -> dict | None:
    for b in data.get("benchmarks", []):
        bw = (b.get("extra_info") or {}).get("bandwidth")
        if bw:
            return bw
    return None


def floor_section(rows: list[dict], tag: str) -> list[str]:
    steps = [r for r in rows if r["kind"] in ("step_small", "step_large") and r["device"] == "cpu" and "floor_ms" in r["info"]]
    if not steps:
        return []
    lines = [f"## Hardware floor of the decoder step (CPU {tag})", "",
             "Bytes a step must read (every weight of decode_step, f_beta, fc, decoder_att, full_att once; one "
             "embedding row per row; enc_out and enc_att once per image; h and c) divided by the memory bandwidth "
             "measured in this run (large array copy, bytes read + written over time). The bytes count fp32 weights: "
             "the int8 step reads about a quarter of the weight bytes, so its own floor is lower than the one shown.", "",
             "| group | bytes read | of which weights | floor | backend | median | multiple of floor |", "|---|---|---|---|---|---|---|"]
    for r in sorted(steps, key=lambda r: (r["kind"], row_order(r))):
        i = r["info"]
        lines.append(f"| {r['group']} | {i['bytes_read'] / 1e6:.1f} MB | {i['bytes_weights'] / 1e6:.1f} MB | {fmt_ms(i['floor_ms'])} | "
                     f"{BACKEND_LABEL.get(r['backend'], r['backend'])} | {fmt_ms(r['median_ms'])} | {r['median_ms'] / i['floor_ms']:.1f}x |")
    return lines + [""]


def build_report(data: dict, results_name: str, charts: list[str], command: str, exit_code: int | None) -> tuple[str, list[dict]]:
    rows = load_rows(data)
    cfg = data.get("run", {}).get("config") or data.get("machine_info", {}).get("sat_bench", {}).get("config", {})
    quick = bool(cfg.get("quick"))
    tag = cpu_tag(data)
    lines = ["# Benchmark report" + (" (quick mode)" if quick else "") + f", measured on CPU {tag}", ""]
    lines += [f"Command: `{command}`; raw results: `{results_name}`" + (f"; pytest exit status {exit_code}" if exit_code is not None else ""), ""]
    lines += ["Medians of one run. Every ratio is measured against the reference: the canonical tutorial's eager "
              "per-image beam search (bench/reference.py: one image at a time, the k beams as the batch, features "
              "tiled per beam, the encoder attention projection recomputed every step; a finished beam stays a row "
              "scored -inf where the tutorial drops it, so once captions end it does a little more work than the "
              "tutorial). "
              "Our backends run `core.decode.beam_search(..., early_stop=False)`: a fixed number of steps for "
              "every backend.", ""]
    lines += machine_section(data)
    lines += not_run_section(data)

    targets = evaluate_targets(rows, quick)
    lines += [f"## Targets (CPU {tag})", "", "| target | measured | goal | status |", "|---|---|---|---|"]
    for t in targets:
        status = t["status"] if t["status"] != "MISSED" else "**MISSED**"
        lines.append(f"| {t['target']} | {t['measured'] or '-'} | {t['goal']} | {status} |")
    missed = [t for t in targets if t["status"] == "MISSED"]
    if missed:
        lines += ["", "Missed targets:"]
        lines += [f"- {t['target']}: {t['measured']} (goal {t['goal']})" + (f". Why: {t['why']}" if t["why"] else "") for t in missed]
    lines.append("")

    groups = group_rows(rows)
    for device, title in (("cpu", "Results on CPU"), ("cuda", "Results on GPU (CUDA)")):
        dev_groups = {g: rs for g, rs in groups.items() if rs[0]["device"] == device and rs[0]["kind"]}
        lines += [f"## {title}", ""]
        if not dev_groups:
            lines += ["Not run" + (": no CUDA GPU on this machine (the gpu-marked rows skip themselves)." if device == "cuda" else "."), ""]
            continue
        if device == "cuda":
            lines += ["ORT runs the CUDA provider with IO binding; every timed call ends with torch.cuda.synchronize().", ""]
        where = f"CPU {tag}" + (f", GPU {data['machine_info']['sat_bench'].get('gpu', '?')}" if device == "cuda" else "")
        for g, rs in dev_groups.items():
            lines += [f"### {g} ({where})", ""] + group_table(rs) + [""]
    other = {g: rs for g, rs in groups.items() if not rs[0]["kind"]}
    if other:
        lines += ["## Other benchmarks", ""]
        for g, rs in other.items():
            lines += [f"### {g} (CPU {tag})", ""] + group_table(rs) + [""]
    lines += floor_section(rows, tag)
    if charts:
        lines += ["## Charts", ""] + [f"![median time per backend]({c})" for c in charts] + [""]
    return "\n".join(lines), targets


def parse_args(argv: list[str]) -> argparse.Namespace:
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small shapes, single rounds (CI smoke)")
    p.add_argument("--groups", type=lambda s: [g.strip() for g in s.split(",") if g.strip()], default=None,
                   help=f"comma-separated families to run: {','.join(FAMILIES)} (default all)")
    p.add_argument("--train", action="store_true", help=f"run {TRAIN_FILE.name} (training benchmarks) in --quick mode too")
    p.add_argument("--no-train", action="store_true", help=f"leave out {TRAIN_FILE.name} (run by default, not in --quick)")
    p.add_argument("--cpu-only", action="store_true", help="deselect the gpu-marked benchmarks")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                   help="start no benchmark that would end past this many minutes from now; those are recorded as "
                        f"'not run: budget' (default {DEFAULT_BUDGET_MIN:g})")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory (default bench/results)")
    p.add_argument("--from-results", nargs="?", const="newest", default=None, metavar="FILE",
                   help="render FILE (.jsonl, or an older pytest-benchmark .json), or the newest run in --out; run nothing")
    p.add_argument("--strict", action="store_true", help="exit 3 when a target is missed (full mode)")
    args = p.parse_args(argv)
    args.pytest_args = pytest_args
    for g in args.groups or []:
        if g not in FAMILIES:
            p.error(f"unknown group {g!r}; choose from {', '.join(FAMILIES)}")
    return args


def render(path: Path, out: Path, command: str, exit_code: int | None) -> list[dict]:
    """report.md (+ charts) in out from whatever the results file holds; returns the targets."""
    data = results.load(path)
    chart, gpu_chart = out / "report.png", out / "report_gpu.png"
    has_chart = write_chart(load_rows(data), chart)
    has_gpu_chart = write_chart(load_rows(data), gpu_chart, device="cuda")
    charts = [c.name for c, ok in ((chart, has_chart), (gpu_chart, has_gpu_chart)) if ok]
    text, targets = build_report(data, path.name, charts, command, exit_code)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    print(f"[bench] wrote {out / 'report.md'}" + (f" and {chart}" if has_chart else "")
          + f" ({len(data['benchmarks'])} benchmarks, {len(data['not_run'])} not run, CPU {cpu_tag(data)})")
    for stale, ok in ((chart, has_chart), (gpu_chart, has_gpu_chart)):
        if not ok and stale.exists():
            stale.unlink()  # a chart from an earlier run would contradict this report
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/report.py " + " ".join(argv)
    exit_code: int | None = None
    if args.from_results:
        path = results.newest(out) if args.from_results == "newest" else Path(args.from_results)
        if path is None or not path.is_file():
            print(f"[bench] no results to render ({args.from_results} in {out})", file=sys.stderr)
            return 1
    else:
        from core import hardware

        print(f"[bench] {hardware.summary()}; budget {args.budget_min:g} min", flush=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = out / f"bench-{stamp}{'-quick' if args.quick else ''}.jsonl"
        t0 = time.perf_counter()
        exit_code = run_pytest(args, path, deadline=time.time() + 60 * args.budget_min)
        print(f"[bench] pytest finished in {time.perf_counter() - t0:.0f} s (exit status {exit_code})", flush=True)
        if not path.is_file():
            print(f"[bench] no results were written ({path}); see the pytest output above", file=sys.stderr)
            return exit_code or 1
    targets = render(path, out, command, exit_code)
    for t in targets:
        print(f"[bench] {t['status']:>12}  {t['target']}: {t['measured'] or '-'} (goal {t['goal']})")
    if exit_code:
        return exit_code
    if args.strict and any(t["status"] == "MISSED" for t in targets):
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
