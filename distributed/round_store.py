"""One store namespace per torchrun round, shared by every rank of the round and used by no earlier round.

    store, round_id = join_round(store, rank, world_size, timeout)   # before init_process_group(store=store, ...)

Why this exists (the cause of "Gloo connectFullMesh failed ... Connection refused" after a node's worker died, with
torch 2.14's c10d rendezvous): torchrun hands its workers one TCP store for the whole job (the rank-0 agent creates
it in the first round and keeps it; ``TORCHELASTIC_USE_AGENT_STORE``), and the process group writes its keys
there (each rank's listening address) under names that hold no round. A prefix made of
``TORCHELASTIC_RESTART_COUNT`` is not shared either: each agent counts its own restarts. The node whose worker died
restarts with count 1; the other agent, which only sees a node waiting at the rendezvous, restarts its workers as a
membership change and keeps 0, unless its own worker failed first on the broken connection. Which of the two
happens first is a race, so after a restart the ranks sometimes looked for each other under different names, and
one of them read the address a dead worker of the previous round had published and dialled a port nobody listens
on (or waited for keys written under another prefix) until every restart was spent.

The fix: rank 0 of the round draws a random namespace and hands it to each other rank in answer to a nonce that rank
drew itself, so no rank can take an answer meant for an earlier round; the process group then lives under that
namespace. Each side waits with a deadline and names what it waited for.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

PREFIX = "sat/round"
POLL_S = 0.05


class RoundJoinError(RuntimeError):
    """The ranks of a round did not all meet before the deadline."""


def _hello(rank: int) -> str:
    return f"{PREFIX}/hello/{rank}"  # the nonce rank ``rank`` drew, overwritten by each round's worker


def _welcome(nonce: str) -> str:
    return f"{PREFIX}/welcome/{nonce}"  # rank 0's answer to one nonce: the round's namespace


def _ack(round_id: str, rank: int) -> str:
    return f"{PREFIX}/{round_id}/ack/{rank}"  # under the fresh namespace: never left over from an earlier round


def join_round(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> tuple[dist.Store, str]:
    """``store`` seen through this round's fresh namespace, and the namespace's name (for the logs)."""
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        round_id = _lead(store, world_size, deadline, timeout)
    else:
        round_id = _follow(store, rank, deadline, timeout)
    return dist.PrefixStore(f"{PREFIX}/{round_id}/pg", store), round_id


def _lead(store: dist.Store, world_size: int, deadline: float, timeout: timedelta) -> str:
    """Rank 0: answer every nonce seen for each rank until that rank acknowledges the round's namespace.

    A nonce left by a dead worker of an earlier round gets an answer nobody reads; the live worker's nonce, written
    before or after, is answered on a later poll."""
    round_id = uuid.uuid4().hex[:16]
    answered: dict[int, str] = {r: "" for r in range(1, world_size)}  # rank -> the last nonce answered
    while answered:
        for r in list(answered):
            if store.check([_ack(round_id, r)]):
                del answered[r]
                continue
            if store.check([_hello(r)]):
                nonce = store.get(_hello(r)).decode()
                if nonce != answered[r]:  # a rank's key holds one nonce at a time: the newest is the one to answer
                    store.set(_welcome(nonce), round_id)
                    answered[r] = nonce
        if answered:
            if time.monotonic() > deadline:
                raise RoundJoinError(
                    f"round {round_id}: rank(s) {sorted(answered)} of {world_size} did not join within "
                    f"{timeout.total_seconds():g}s (their workers never started, or hang; see their node's log)")
            time.sleep(POLL_S)
    return round_id


def _follow(store: dist.Store, rank: int, deadline: float, timeout: timedelta) -> str:
    """Rank > 0: post a fresh nonce, wait for rank 0's answer to that very nonce, acknowledge it."""
    nonce = uuid.uuid4().hex
    store.set(_hello(rank), nonce)
    key = _welcome(nonce)
    try:
        store.wait([key], timedelta(seconds=max(0.1, deadline - time.monotonic())))
    except (dist.DistStoreError, RuntimeError) as e:
        raise RoundJoinError(f"rank {rank}: rank 0 of this round did not answer within {timeout.total_seconds():g}s "
                             f"(its worker never started, or hangs; see node 0's log): {e}") from e
    round_id = store.get(key).decode()
    store.delete_key(key)
    store.set(_ack(round_id, rank), "1")
    return round_id


def node_replacement_warning() -> str | None:
    """What to set so that a node can be replaced, when this multi-node job runs on torchrun's shared worker store.

    With the store shared (torchrun's default), only the first round's rank-0 agent publishes the master address; an
    agent that joins later (a replaced node) waits for it until the rendezvous's read timeout (60 s by default) and
    the job ends. With ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` on every agent, each round publishes its own and
    the new node joins (tests/integration/test_multinode.py, torch 2.14)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("GROUP_WORLD_SIZE", 1)) < 2:
        return None
    return ("this multi-node job uses torchrun's shared worker store: a restarted worker recovers, but a node "
            "replaced by a new agent cannot join (the job ends after the rendezvous read timeout); set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node's torchrun to allow it")
