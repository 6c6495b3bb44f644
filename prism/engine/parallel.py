"""Tensor parallelism across the GPUs of one host: the process group and what ranks agree on.

Each rank is its own process with its own engine (one GPU, that GPU's PagePool shared with
the other models there). Ranks run the *same* engine code on the *same* inputs in lockstep,
so their schedulers take the same decisions, as long as every input that could differ
between ranks is agreed on through a collective:

- KV pages: a GPU's pool is shared with other models, so ranks may have different room.
  `TPPageMapper` answers the block manager with the minimum over ranks and maps a page only
  if every rank could (else nobody keeps it), so all block managers stay identical;
- the page budget (request limits, KV geometry): the minimum over ranks, once;
- weights mapped (activation): all ranks or none;
- sampled tokens: logits are all-gathered, so greedy rows agree by construction; when a
  batch samples at random, rank 0's tokens are broadcast.

Device collectives (all-reduce after the row-parallel o and down projections, the logits
all-gather, the token broadcast) go through `group` (NCCL on GPUs, gloo on CPU); host-side
agreement (small integers) through `cpu_group` (gloo), so it never synchronizes a GPU stream.
What the driver must do: give every rank the same requests, aborts and evictions between the
same steps, with a deterministic victim chooser (the default is). See docs/architecture.md.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from prism import env
from prism.engine.kv_cache import PagedKVCache

# NVLink multicast (NVLS) must stay off on the lent machines: a program using it can take the
# host's GPUs out of service. Set in every rank before the process group starts.
disable_multicast = env.disable_multicast


def free_port() -> int:
    """A free TCP port on loopback (for init_method="tcp://127.0.0.1:<port>")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group. `group` / `cpu_group` None: the
    default (world) group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # device collectives
    cpu_group: dist.ProcessGroup | None = None  # host-side agreement (gloo)

    # ---- device collectives (in the forward pass) -----------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks, in place; returns x."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along `dim` in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place; returns x."""
        dist.broadcast(x, group=self.group, group_src=0)
        return x

    # ---- host-side agreement ----------------------------------------------------------------
    def min_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        return self.min_int(1 if flag else 0) == 1

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)


def init_tp_group(rank: int, size: int, port: int, backend: str = "nccl",
                  device: torch.device | str | None = None, timeout_s: float = 600.0) -> TPGroup:
    """Join a `size`-process group on loopback (one process per GPU of this host) and return
    this rank's TPGroup. A CUDA `device` becomes the current device. NCCL: multicast is
    switched off, and a gloo group is made for host-side agreement."""
    if backend == "nccl":
        disable_multicast()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=timeout)
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TPGroup(rank, size, None, cpu_group)


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class TPPageMapper:
    """The block manager's PageMapper for a tensor-parallel rank: the rank's own KV cache, with
    every answer agreed on by all ranks (see the module docstring). Ranks call it at the same
    points because their schedulers are identical; one small host collective per call, and
    the block manager calls it only when it needs a new page or checks room for admission."""

    def __init__(self, kv: PagedKVCache, tp: TPGroup):
        self.kv = kv
        self.tp = tp

    def num_mappable_pages(self) -> int:
        return self.tp.min_int(self.kv.num_mappable_pages())

    def map_page(self, page: int) -> bool:
        ok = self.kv.map_page(page)
        if self.tp.all_true(ok):
            return True
        if ok:  # another rank could not: nobody keeps the page
            self.kv.unmap_page(page)
        return False

    def unmap_page(self, page: int) -> None:
        self.kv.unmap_page(page)


__all__ = ["TPGroup", "TPPageMapper", "destroy_tp_group", "disable_multicast",
           "free_port", "init_tp_group"]
