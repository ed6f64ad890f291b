"""How a batch job uses the cluster: batch size, actors, threads per actor and the Ray resources each asks for.

    plan = make_plan([{"CPU": 2.0}, {"CPU": 16.0, "GPU": 1.0}], PlanRequest())   # the alive nodes' resources
    log.info("%s", plan.describe())

CPU nodes: one single-threaded actor per CPU (measured faster than fewer actors with ORT's intra-op threads: see
``CPU_THREADS``). Each actor reserves 3/4 of its threads as Ray CPUs and the decode tasks 1/4 CPU each, so decoding
always finds room beside the actors on every node and overlaps their compute, as the caption command's loader
threads do. GPU nodes: one actor per GPU (``num_gpus=1``). Every choice can be set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# On CPU, one single-threaded actor per CPU: processes in parallel beat ORT's intra-op threads beside the decode tasks
# (2-core Zen 3, 2,000 JPEGs, int8: 1 actor x 2 threads 0.82x the caption command's images/s, 2 x 1 thread 0.97x;
# fp32 2 x 1: 0.99x). --threads N gives each actor N threads and one actor per N CPUs instead.
CPU_THREADS = 1
CPU_BATCH, GPU_BATCH = 32, 64  # images per actor call: Ray's per-task cost (~ms) over 32 images' seconds
DECODE_CPUS = 0.25
ACTOR_CPU_SHARE = 0.75


@dataclass
class PlanRequest:
    batch_size: int | None = None
    actors: int | None = None
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Plan:
    batch_size: int
    actors: int
    threads: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float = DECODE_CPUS
    why: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.actors} actor(s) x {self.threads} thread(s), batch {self.batch_size}, each actor "
                f"{self.actor_cpus:g} CPU + {self.actor_gpus:g} GPU, decode tasks {self.decode_cpus:g} CPU "
                f"({'; '.join(self.why)})")


def make_plan(nodes: list[dict[str, float]], req: PlanRequest) -> Plan:
    """The plan for alive nodes' resources (``ray.nodes()[i]["Resources"]``)."""
    nodes = [n for n in nodes if n.get("CPU", 0) > 0 or n.get("GPU", 0) > 0]
    if not nodes:
        raise ValueError("the Ray cluster has no node with a CPU or GPU")
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    use_gpu = req.device == "cuda" or (req.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise ValueError("--device cuda but the Ray cluster has no GPU")
    why = []
    if use_gpu:
        threads = req.threads or 2  # the search's own ops and the feed; the GPU does the work
        actors = req.actors or gpus
        why.append(f"{gpus} GPU(s) in the cluster: one actor each" if not req.actors else "--actors")
        batch = req.batch_size or GPU_BATCH
        return Plan(batch, actors, threads, min(float(threads), 1.0), 1.0, why=why + _batch_why(req, batch))
    node_cpus = min(int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0)
    threads = req.threads or CPU_THREADS
    why.append("--threads" if req.threads else f"single-threaded actors, one per CPU (smallest node: {node_cpus})")
    per_node = max(1, node_cpus // threads)
    actors = req.actors or per_node * sum(1 for n in nodes if n.get("CPU", 0) > 0)
    why.append("--actors" if req.actors else f"{per_node} actor(s) on each of {len(nodes)} node(s)")
    # reserve less than the threads: Ray CPUs are bookkeeping, and the decode tasks must fit beside the actors
    actor_cpus = max(0.25, min(threads, node_cpus / per_node) * ACTOR_CPU_SHARE)
    batch = req.batch_size or CPU_BATCH
    return Plan(batch, actors, threads, actor_cpus, 0.0, why=why + _batch_why(req, batch))


def _batch_why(req: PlanRequest, batch: int) -> list[str]:
    return ["--batch-size"] if req.batch_size else [f"batch {batch} by default"]
