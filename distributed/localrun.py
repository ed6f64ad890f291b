"""torchrun for one machine, with every store the agent opens listening on 127.0.0.1 only.

``torchrun --standalone`` (and ``--rdzv-endpoint=127.0.0.1:0``) listens on every interface: torch's TCPStore server
binds the wildcard address whatever host name it is given (checked with ``ss -ltnp`` on torch 2.14), and the
rendezvous reads what any peer writes there. TCPStore does accept an already-bound socket (``master_listen_fd``), so
this launcher registers a rendezvous backend, ``loopback``, that binds both of the agent's stores (the rendezvous
store and the store the workers share) to 127.0.0.1 and then runs torchrun itself:

    python -m distributed.localrun --nproc_per_node=2 distributed/train.py --data DATA --out OUT

Every torchrun flag is accepted except the rendezvous ones, which are fixed to one node on this machine.
Multi-node jobs use torchrun's own c10d rendezvous (docs/multinode.md).
"""

from __future__ import annotations

import socket
import sys
import uuid

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, create_handler

LOOPBACK = "127.0.0.1"
BACKEND = "loopback"
FIXED = ("standalone", "rdzv_backend", "rdzv_endpoint", "nnodes", "local_addr", "master_addr")  # torchrun's dests


def loopback_store(port: int = 0) -> dist.TCPStore:
    """A TCPStore server listening on 127.0.0.1 only (``port`` 0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    return dist.TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         master_listen_fd=sock.detach())


class LoopbackHandler(DynamicRendezvousHandler):
    def _create_tcp_store_server(self, master_addr, master_port) -> dist.TCPStore:
        return loopback_store(master_port)  # the store the workers share (MASTER_ADDR/MASTER_PORT)

    def get_backend(self) -> str:
        return BACKEND  # torchrun checks the handler is the backend it asked for


def _create_loopback_handler(params: RendezvousParameters) -> DynamicRendezvousHandler:
    store = loopback_store()
    handler = create_handler(store, C10dRendezvousBackend(store, params.run_id), params)
    handler.__class__ = LoopbackHandler  # same state, one overridden method
    return handler


def torchrun_args(argv: list[str]) -> list[str]:
    """torchrun's arguments for one node on loopback; a rendezvous flag of the user's is an error.

    Read by torchrun's own parser, so ``--standalone`` is found however the flags before it are written
    (``--nproc_per_node 2 --standalone train.py`` included)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    given = parser.parse_args(argv)
    defaults = parser.parse_args([given.training_script])
    for dest in FIXED:
        if getattr(given, dest) != getattr(defaults, dest):
            raise SystemExit(f"distributed.localrun: --{dest.replace('_', '-')} is fixed here (one node on "
                             f"{LOOPBACK}); use torchrun itself for other rendezvous settings")
    return [f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={LOOPBACK}:0", f"--rdzv-id={uuid.uuid4().hex}",
            "--nnodes=1", f"--local-addr={LOOPBACK}", *argv]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun_main

    args = torchrun_args(sys.argv[1:] if argv is None else argv)
    rendezvous_handler_registry.register(BACKEND, _create_loopback_handler)
    torchrun_main(args)


if __name__ == "__main__":
    main()
