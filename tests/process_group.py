"""Running a test function on several CPU processes joined in one gloo process group (what the statistics reduced
across processes are checked with)."""

import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, function, args: tuple, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results[rank] = function(rank, *args)
    finally:
        dist.destroy_process_group()


def run_in_process_group(function, *args, world_size: int = 2) -> list:
    """`function(rank, *args)` on `world_size` spawned processes of one gloo group: what each rank returned, in rank
    order. `function` must be importable (a module-level function) and its results picklable."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world_size, free_port(), function, args, results), nprocs=world_size, join=True)
    return [results[rank] for rank in range(world_size)]
