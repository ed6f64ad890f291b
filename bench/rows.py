"""The benchmark results as rows: labels, order, groups, lookups and ratios (shared by the report and its targets)."""

from __future__ import annotations

from typing import Any

BACKEND_ORDER = ["reference", "eager", "eager_bf16", "torchscript", "ort", "ort_int8", "ort_fp16", "ort_bf16enc",
                 "ort_int8enc", "ort_int8full", "auto"]
BACKEND_LABEL = {
    "reference": "reference (tutorial, per image)",
    "eager": "eager fp32",
    "eager_bf16": "eager bf16 autocast",
    "torchscript": "TorchScript",
    "ort": "ONNX Runtime fp32",
    "ort_int8": "ONNX Runtime int8 step",
    "ort_fp16": "ONNX Runtime fp16",
    "ort_bf16enc": "eager bf16 encoder + ORT fp32 step",
    "ort_int8enc": "ORT int8 encoder (shipped) + ORT fp32 step",
    "ort_int8full": "ORT int8 encoder + int8 step (--precision int8)",
    "auto": "--precision auto (the caption command's default)",
}
# The training group (test_bench_train.py:test_train_vs_tutorial): "fp32-k5-cache" -> "ours fp32, 5 captions/pass, cache"
TRAIN_LABEL = {"tutorial": "tutorial train() (fp32, encoder per caption)"} | {
    f"{p}-k{k}{c}": f"ours {p}, {k} caption{'s' if k > 1 else ''}/encoder pass{', feature cache' if c else ''}"
    for p in ("fp32", "auto") for k in (1, 5) for c in ("", "-cache")}
ENCODER_LABEL = {"ort_int8enc": "ORT int8 encoder (shipped)"}  # the step part is unused in encoder groups
CFG_IMAGES = {"caption_small": "1 image", "caption_large": "32 images"}
KIND_ORDER = ["encoder_small", "encoder_large", "step_small", "step_large", "caption_small", "caption_large", "beam_large"]


def load_rows(data: dict) -> list[dict[str, Any]]:
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        st = b["stats"]
        rows.append({
            "name": b["name"],
            "group": b.get("group") or "(no group)",
            "kind": info.get("kind"),
            "backend": info.get("backend", b["name"]),
            "device": info.get("device", "cpu"),
            "median_ms": st["median"] * 1e3,
            "min_ms": st["min"] * 1e3,
            "max_ms": st["max"] * 1e3,
            "rounds": st["rounds"],
            "info": info,
        })
    return rows


def label(row: dict) -> str:
    if (row["kind"] or "").startswith("encoder") and row["backend"] in ENCODER_LABEL:
        return ENCODER_LABEL[row["backend"]]
    if row["kind"] == "train_tutorial":
        return TRAIN_LABEL.get(row["backend"], row["backend"])
    return BACKEND_LABEL.get(row["backend"], row["backend"])


def fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def row_order(row: dict) -> tuple:
    b = row["backend"]
    return (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), row["name"])


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (KIND_ORDER.index(r["kind"]) if r["kind"] in KIND_ORDER else 99, r["group"])):
        groups.setdefault(r["group"], []).append(r)
    return {g: sorted(rs, key=row_order) for g, rs in groups.items()}


def find(rows: list[dict], kind: str, backend: str, device: str = "cpu") -> dict | None:
    for r in rows:
        if r["kind"] == kind and r["backend"] == backend and r["device"] == device:
            return r
    return None


def speedup(rows: list[dict], kind: str, backend: str, device: str = "cpu", base: str = "reference") -> float | None:
    r, ref = find(rows, kind, backend, device), find(rows, kind, base, device)
    if r is None or ref is None:
        return None
    return ref["median_ms"] / r["median_ms"]
