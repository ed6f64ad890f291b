"""distributed.round_store on a real TCPStore: the ranks of a round agree on one fresh namespace even when the store
holds what an earlier round left (the multi-node restart failure), and a missing rank is named within the deadline."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from distributed.round_store import RoundJoinError, _hello, join_round


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))


def _client(server: dist.TCPStore) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))


def _round(server: dist.TCPStore, world_size: int, timeout_s: float = 10, start_delay: dict | None = None) -> dict:
    """Every rank of one round joins from its own thread and client; returns {rank: round id}."""
    ids: dict[int, str] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        time.sleep((start_delay or {}).get(rank, 0))
        try:
            prefixed, ids[rank] = join_round(_client(server), rank, world_size, timedelta(seconds=timeout_s))
            prefixed.set(f"seen/{rank}", "1")  # the namespace is usable as a store
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5)
    if errors:
        raise errors[0]
    return ids


def test_the_ranks_of_a_round_share_one_namespace_and_a_new_round_gets_another(store):
    first = _round(store, 3)
    assert len(set(first.values())) == 1
    second = _round(store, 3, start_delay={0: 0.3})  # rank 0 late: the others' nonces wait for it
    assert len(set(second.values())) == 1 and set(second.values()) != set(first.values())


def test_a_nonce_left_by_a_dead_worker_of_an_earlier_round_is_not_taken_for_the_live_one(store):
    """Rank 1's key from a dead worker is there when the new rank 0 starts, and the live rank 1 comes later."""
    store.set(_hello(1), "nonce-of-a-dead-worker")
    ids = _round(store, 2, start_delay={1: 0.5})
    assert len(set(ids.values())) == 1


def test_a_rank_that_never_comes_is_named_within_the_deadline(store):
    with pytest.raises(RoundJoinError, match=r"rank\(s\) \[1\] of 2 did not join within 0.5s"):
        join_round(_client(store), 0, 2, timedelta(seconds=0.5))
    with pytest.raises(RoundJoinError, match="rank 0 of this round did not answer within 0.5s"):
        join_round(_client(store), 1, 2, timedelta(seconds=0.5))
