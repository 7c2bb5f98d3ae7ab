"""PyTorch distributed, when the CLI was started by `torchrun`; a no-op otherwise."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group that torchrun set up (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    """Rank 0 (or no torchrun): the process that writes shared outputs."""
    return rank_and_world()[0] == 0


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (pickled; for small or one-off things like a checkpoint)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on every rank) concatenated along dim 0 in rank order;
    `t` itself without torchrun."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    buf = _on_backend(t.contiguous())
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts).to(t.device)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (identical result on every rank); returns `t`."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s values, in place; returns `t`."""
    if dist.is_initialized():
        dist.broadcast(t, src=src)
    return t


# ---- additive helpers for atlas.analyze: reductions other than a sum, and point-to-point ----------

def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or a copy on this rank's GPU when the backend (nccl) cannot take CPU tensors."""
    if dist.get_backend() == "nccl" and not t.is_cuda:
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `t` over ranks in place with `op` ("sum", "max" or "min"); returns `t`.

    Max and min are exact in any order; so is a sum of integers, or of floats where every
    position is nonzero on at most one rank."""
    if dist.is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        buf = _on_backend(t)
        dist.all_reduce(buf, op=ops[op])
        if buf is not t:
            t.copy_(buf)
    return t


def send(t: torch.Tensor, dst: int) -> None:
    """Send `t` to rank `dst` (which calls recv_ with a tensor of the same shape and dtype)."""
    dist.send(_on_backend(t.contiguous()), dst=dst)


def recv_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into `t`, in place, what rank `src` sent; returns `t`."""
    buf = _on_backend(t)
    dist.recv(buf, src=src)
    if buf is not t:
        t.copy_(buf)
    return t
