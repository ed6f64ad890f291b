#!/usr/bin/env bash
# One entry point for the toolkit. Every subcommand first makes sure the virtual environment exists
# (created once, reinstalled only when pyproject.toml changes).
#
#   ./launch.sh help
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

usage() {
    cat <<'EOF'
usage: ./launch.sh COMMAND [ARGS...]

  setup            create .venv and install the toolkit with its dev extras (idempotent)
  test [ARGS]      run the test suite (pytest tests/: unit, integration, robustness; the import rules and ruff
                   are tests too; ARGS go to pytest, e.g. -m "not slow" or tests/unit)
  docs             build the docs site into site/ (python -m mkdocs build --strict)
  demo             the main job end to end on synthetic data: generate, train (2 CPU processes), export, caption
  train [ARGS]     torchrun distributed/train.py with NPROC processes (default: #GPUs, else 2); ARGS pass through;
                   one node, its rendezvous stores listening on 127.0.0.1 only (distributed/localrun.py)
  export [ARGS]    python export/to_onnx.py ARGS
  caption [ARGS]   python -m export.caption ARGS
  evaluate [ARGS]  python -m core.evaluate RESULTS.json --data DIR --split test (the COCO caption metrics)
  check DATA_DIR   scan a dataset for bad images and caption lines (python -m core.data check)
  synth [ARGS]     python -m core.synthetic ARGS
  bench [ARGS]     python bench/report.py ARGS (benchmarks, markdown table, chart)
  serve [ARGS]     python -m export.serve ARGS (HTTP captions with dynamic batching, web page at /)
  bench-serve [ARGS]  python bench/serve_load.py ARGS (concurrent clients: dynamic batching vs --max-batch 1)
  doctor           what this machine can do (CPU ISA, bf16, VNNI, GPUs, DALI, ONNX Runtime CUDA) and what the
                   toolkit chooses from it (training precision, captioning path, int8 format, DALI decoder)
  gpu-check        with an NVIDIA GPU: gpu tests, torchrun NCCL+DALI+AMP training, --fp16 export, ORT CUDA parity,
                   GPU benchmarks, a table, <= 8 min, exit 1 on a failure; without a GPU: one line, exit 0
  help             this text

environment: NPROC (processes for train), VENV (virtualenv path, default .venv), DEMO_DIR (default runs/demo)
EOF
}

setup() {
    local stamp="$VENV/.installed"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "[launch] setting up $VENV (first run takes a minute or two)" >&2
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip >&2 || true
    "$PY" -m pip install --quiet -e ".[dev]" >&2
    echo "$want" > "$stamp"
}

nproc_default() {
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)"
    fi
    if [[ "$gpus" -gt 0 ]]; then echo "$gpus"; else echo 2; fi
}

demo() {
    # The main job end to end on synthetic data (no download): generate 6000 scenes in the Flickr8k layout
    # (4800 train / 600 val / 600 held-out test images), train with 2 CPU processes (torchrun + gloo, a fixed number
    # of optimizer steps: distributed/config.py:PRESETS["demo"]; precision chosen from the hardware), then export
    # and caption held-out images. Re-running resumes an interrupted run (`rm -rf runs/demo/run` starts over).
    # Extra arguments go to train.py, e.g. `./launch.sh demo --max-steps 200`.
    local dir="${DEMO_DIR:-runs/demo}"
    local nproc="${NPROC:-2}"
    local t0 t1 t2 t3 t4
    t0=$(date +%s.%N)
    echo "[demo] hardware: $("$PY" -c 'from core import hardware; print(hardware.summary())')" >&2
    if [[ ! -f "$dir/data/Flickr8k.token.txt" ]]; then
        "$PY" -m core.synthetic "$dir/data" --images 6000 --seed 1
    fi
    t1=$(date +%s.%N)
    # distributed.localrun: torchrun with its stores on 127.0.0.1 (--standalone listens on every interface)
    "$PY" -m distributed.localrun --nproc_per_node="$nproc" distributed/train.py \
        --data "$dir/data" --out "$dir/run" --preset demo "$@"
    t2=$(date +%s.%N)
    "$PY" export/to_onnx.py --checkpoint "$dir/run/best.pt" --out "$dir/exported"
    t3=$(date +%s.%N)
    "$PY" -m export.caption --model "$dir/exported" --backend ort --beam-size 3 --split test --limit 8 \
        --data "$dir/data" --save-dir "$dir/captioned_images"
    t4=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" 'BEGIN {
        printf "[demo] seconds per phase: data %.0f | training + test metrics %.0f | export %.0f | captions %.0f | total %.0f\n",
               b - a, c - b, d - c, e - d, e - a }' >&2
    "$PY" - "$dir/run/test_metrics.json" <<'EOF' >&2
import json, sys
from distributed.run_outputs import fmt_coco
m = json.load(open(sys.argv[1]))
print(f"[demo] held-out test ({m['images']} images, beam {m['beam_size']}, {m['weights']}): BLEU-4 {m['bleu4']:.3f}, "
      f"CIDEr-D {m['cider']:.3f} (fast metrics); {m['steps']} steps, {m['train_seconds']:.0f}s of training")
print(f"[demo] {fmt_coco(m)}")
EOF
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift

case "$cmd" in
    help|-h|--help) usage ;;
    setup) setup; echo "[launch] environment ready: $VENV" ;;
    test) setup; exec "$PY" -m pytest tests "$@" ;;
    docs) setup; NO_MKDOCS_2_WARNING=1 exec "$PY" -m mkdocs build --strict --site-dir site ;;
    train)
        setup
        NPROC="${NPROC:-$(nproc_default)}"
        exec "$PY" -m distributed.localrun --nproc_per_node="$NPROC" distributed/train.py "$@"  # loopback only
        ;;
    export) setup; exec "$PY" export/to_onnx.py "$@" ;;
    caption) setup; exec "$PY" -m export.caption "$@" ;;
    evaluate) setup; exec "$PY" -m core.evaluate "$@" ;;
    check) setup; exec "$PY" -m core.data check "$@" ;;
    synth) setup; exec "$PY" -m core.synthetic "$@" ;;
    bench) setup; exec "$PY" bench/report.py "$@" ;;
    serve) setup; exec "$PY" -m export.serve "$@" ;;
    bench-serve) setup; exec "$PY" bench/serve_load.py "$@" ;;
    doctor) setup; exec "$PY" -m distributed.doctor "$@" ;;
    demo) setup; demo "$@" ;;
    gpu-check) [[ -x "$PY" ]] || PY=python3; exec "$PY" -m tools.gpu_check "$@" ;;  # no setup: offline GPU machine
    *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
