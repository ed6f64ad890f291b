"""Caption a million images: batch inference on Ray Data, on this machine or on a Ray cluster.

    python -m export.batch_caption photos/ --model exported/ --out captions/                 # this machine
    python -m export.batch_caption "s3://bucket/photos/**/*.jpg" --model exported/ --out s3://bucket/captions/ \\
        --address auto                                                                       # a running cluster
    python -m export.batch_caption list.txt table.parquet --path-column file --model exported/ --out out/ --format jsonl

Inputs: directories (their image files; --recursive for subfolders), globs, text files of paths (.txt/.lst, one a
line) and Parquet/CSV tables (.parquet/.csv, the --path-column column); local paths or any filesystem pyarrow
reaches (s3://, gs://, ...), one filesystem per job. Output: shards part-*.parquet (or .jsonl) in --out with one row
per input, columns path, caption, score, tokens (the caption's token ids), error, model_sha256. A file that is not
a usable image is a row with its error; the job goes on.

Pipeline: the inputs in chunks of --batch-size files (a Ray Data dataset of chunks); CPU tasks read each chunk's bytes
through pyarrow's filesystem and decode and resize them with core.images (the caption command's loader); an actor pool captions them (one Captioner per actor, loaded once, the manifest's sha256 checked on
every worker); this process writes shards as results come, and a progress line (done, rate, time left) on stderr.
A rerun with the same --out skips the paths already written by the same model (by manifest sha256): a job stopped
at any point resumes, and a path is never written twice. An actor that dies is restarted by Ray and its batch
captioned again; its rows are written once.

Without --address, Ray starts inside this process on this machine (its node address the loopback); --address auto
(or host:port, or ray://host:10001) joins a cluster whose nodes all see --model at the same path (a shared
filesystem), or with --ship-model receive it through Ray's runtime_env. The toolkit must be importable on every node.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

from core.cli import positive_int, run_main
from core.fileio import printable, sha256_file
from core.logs import add_verbosity_args, get_logger, setup_logging
from export.manifest import MANIFEST, ExportFormatError, check_pinned, read_manifest
from export.runtime.batch.inputs import BatchInputError, Item, Source, list_inputs
from export.runtime.batch.output import FORMATS, ShardWriter, written_paths
from export.runtime.batch.plan import Plan, PlanRequest, make_plan
from export.runtime.batch.progress import BatchProgress
from export.runtime.load import add_model_args

log = get_logger("batch_caption")
# Ray takes this machine's address for its node unless told there is no cluster beyond it: then the loopback
# (ray._private.services.get_node_ip_address). Set before Ray's first import, for a local Ray or a loopback --address.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.batch_caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("inputs", nargs="+", help="directories, globs, text files of paths, Parquet/CSV tables")
    p.add_argument("--out", required=True, help="output directory (local or a URI); a rerun resumes it")
    p.add_argument("--format", choices=list(FORMATS), default="parquet", help="shard format (default parquet)")
    p.add_argument("--path-column", default="path", help="the column of paths in a Parquet/CSV input (default path)")
    p.add_argument("--recursive", action="store_true", help="directories: image files of every subfolder too")
    p.add_argument("--shard-rows", type=positive_int, default=5000, help="rows per output shard (default 5000)")
    p.add_argument("--flush-seconds", type=float, default=60.0,
                   help="commit the shard being filled after this long (default 60): what a crash can cost")
    add_model_args(p, beam_size=5)
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None,
                   help="join this Ray cluster (auto, host:port, ray://host:port); default: start Ray locally")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per actor call (default 32, GPU 64)")
    g.add_argument("--actors", type=positive_int, default=None, help="captioning actors (default: by the resources)")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="local Ray only: CPUs it may use (default all)")
    g.add_argument("--ship-model", action="store_true", help="send --model to the workers in Ray's runtime_env")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines (default 10)")
    add_verbosity_args(p)
    return p


# ------------------------------------------------------------------------------------------------- ray
def start_ray(args: argparse.Namespace, runtime_env: dict | None) -> str | None:
    """Join --address, or start Ray in this process (loopback node address, a private temp dir). Returns the
    temp dir to delete at the end (local Ray), else None."""
    if not args.address or is_loopback(args.address):
        os.environ.update(LOOPBACK)
    import ray

    quiet = args.verbose <= 0
    if args.address:
        ray.init(address=args.address, runtime_env=runtime_env, log_to_driver=not quiet,
                 logging_level=logging.WARNING if quiet else logging.INFO)
        return None
    temp_dir = tempfile.mkdtemp(prefix="sat-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
             runtime_env=runtime_env, log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
    return temp_dir


def is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def quiet_ray_data(verbose: int) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our progress line instead
    ctx.print_on_execution_start = verbose > 0
    if verbose <= 0:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def build_dataset(args, src: Source, todo: list[Item], plan: Plan, preprocess: dict, sha256: str, model: str | None):
    """One row per caption batch (``plan.batch_size`` files in input order) -> read + decode tasks -> actors."""
    import ray.data

    from export.runtime.batch.worker import CaptionActor, read_and_decode

    n = plan.batch_size
    chunks = [{"paths": [i.fs_path for i in todo[k:k + n]], "known": [i.error or "" for i in todo[k:k + n]]}
              for k in range(0, len(todo), n)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(read_and_decode, fn_kwargs={"fs": src.fs, "preprocess": preprocess}, batch_size=1,
                        num_cpus=plan.decode_cpus)
    return ds.map_batches(CaptionActor, fn_constructor_args=(args, model, sha256), batch_size=1,
                          compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.actor_cpus,
                          num_gpus=plan.actor_gpus)


# --------------------------------------------------------------------------------------------- the run
def model_identity(args: argparse.Namespace) -> tuple[dict, str]:
    """(the manifest's preprocess section, manifest.json's sha256), checked against --expect-sha256 if given."""
    manifest = read_manifest(args.model)
    sha = check_pinned(args.model, args.expect_sha256) if args.expect_sha256 else sha256_file(args.model / MANIFEST)
    return manifest["preprocess"], sha


def error_rows(items: list[Item], sha256: str) -> list[dict]:
    return [{"path": i.path, "error": i.error, "model_sha256": sha256} for i in items]


def run_job(args, src: Source, todo: list[Item], writer: ShardWriter, preprocess: dict, sha256: str) -> Counter:
    """Caption ``todo`` on Ray, writing rows as they come. Returns rows per node id."""
    progress = BatchProgress(len(todo), args.progress_every, done=writer.rows)
    nodes: Counter = Counter()
    if todo:
        plan = make_plan(alive_nodes(), PlanRequest(args.batch_size, args.actors, args.threads, args.device))
        log.info("plan: %s", plan.describe())
        args.threads = plan.threads  # what each actor's load_captioner gives ORT and torch
        model = None if args.ship_model else str(args.model.resolve())
        user_path = {i.fs_path: i.path for i in todo}
        ds = build_dataset(args, src, todo, plan, preprocess, sha256, model)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            for r in rows:
                r["path"] = user_path.get(r["path"], r["path"])
                nodes[r.pop("node")] += 1
            progress.update(writer.write(rows))
        log.debug("Ray Data's stages:\n%s", ds.stats())  # -v: where the time went, per operator
    missing = [i for i in todo if i.path not in writer.seen]  # none: every chunk's rows come back (a safety net)
    writer.write(error_rows([Item(i.path, i.fs_path, f"{i.path}: could not be read") for i in missing], sha256))
    progress.finish(writer.rows)
    return nodes


def prepare(args) -> tuple[Source, list[Item], Source, str, dict, str]:
    """Inputs, output and model checked, before Ray starts: (src, todo, out_src, out_dir, preprocess, sha256)."""
    src, items = list_inputs(args.inputs, args.path_column, args.recursive)
    preprocess, sha256 = model_identity(args)
    out_src = Source(args.out)
    out_dir = out_src.to_fs(args.out)
    done = written_paths(out_src.fs, out_dir, sha256)
    todo = [i for i in items if i.path not in done]
    log.info("%d input images, %d already in %s (model %s...), %d to caption", len(items), len(items) - len(todo),
             args.out, sha256[:12], len(todo))
    return src, todo, out_src, out_dir, preprocess, sha256


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("batch_caption", args.verbose - args.quiet)
    if args.backend == "eager" and args.model.is_file():
        print("error: --model must be an export directory (python export/to_onnx.py makes one)", file=sys.stderr)
        return 2
    try:
        src, todo, out_src, out_dir, preprocess, sha256 = prepare(args)
    except (BatchInputError, ExportFormatError) as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {printable(f'{e.filename or args.out}: {e.strerror or e}')}", file=sys.stderr)
        return 2
    if not todo:
        log.info("nothing left to caption in %s", args.out)
        return 0
    if all(i.error for i in todo):  # nothing to read: the rows are the listing's errors, no Ray needed
        with ShardWriter(out_src.fs, out_dir, args.format, args.shard_rows, args.flush_seconds) as writer:
            writer.write(error_rows(todo, sha256))
        log.info("%d rows written to %s, every one an error (no image could be read)", writer.rows, args.out)
        return 0
    if importlib.util.find_spec("ray") is None:  # not imported yet: LOOPBACK must come first
        print("error: Ray is not installed: pip install -e '.[scale]' (the ray[data] extra)", file=sys.stderr)
        return 2
    runtime_env = {"working_dir": str(args.model)} if args.ship_model else None
    t0 = time.perf_counter()
    temp_dir = start_ray(args, runtime_env)
    import ray  # after start_ray: LOOPBACK is set before Ray's first import

    try:
        quiet_ray_data(args.verbose)
        log.info("Ray ready in %.1f s (%s)", time.perf_counter() - t0, "joined " + args.address if args.address
                 else f"local, {ray.cluster_resources().get('CPU', 0):g} CPU")
        with ShardWriter(out_src.fs, out_dir, args.format, args.shard_rows, args.flush_seconds) as writer:
            nodes = run_job(args, src, todo, writer, preprocess, sha256)
        log.info("%d rows written to %s in %d shard(s); rows by node: %s%s", writer.rows, args.out,
                 len(writer.shards), ", ".join(f"{n[:8]} {c}" for n, c in nodes.most_common()) or "none",
                 f"; {writer.duplicates} duplicate rows of a retried batch dropped" if writer.duplicates else "")
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

