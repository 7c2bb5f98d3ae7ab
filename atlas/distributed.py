"""PyTorch distributed, when the CLI was started by `torchrun`; a no-op otherwise.

What train and analyze share: joining the process group, this rank's device, and the collectives
they call (each a no-op without torchrun, so a stage's code reads the same either way).
"""

from __future__ import annotations

import inspect
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


def is_main() -> bool:
    """Rank 0 (or no torchrun): the process that writes shared outputs."""
    return rank_and_world()[0] == 0


def local_device(device: str | torch.device) -> torch.device:
    """The device this process computes on: under torchrun a CUDA device means this rank's GPU
    (LOCAL_RANK, set by `init`), even when the config says "cuda:0"."""
    device = torch.device(device)
    if rank_and_world()[1] > 1 and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` under DistributedDataParallel, which broadcasts rank 0's parameters now and averages
    gradients in backward. Buffers are not copied from rank 0 before each forward: the caller
    computes them identically on every rank (atlas.train checks that they agree at the end)."""
    from torch.nn.parallel import DistributedDataParallel

    no_buffer_sync = ({"forward_sync_buffers": False}  # the name since torch 2.13
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[torch.cuda.current_device()] if device.type == "cuda"
                                   else None, **no_buffer_sync)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


# ---- tensor collectives: CPU tensors go through this rank's GPU when the backend is nccl ----------

def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or a copy on this rank's GPU when the backend (nccl) cannot take CPU tensors."""
    if dist.get_backend() == "nccl" and not t.is_cuda:
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on every rank) concatenated along dim 0 in rank order;
    `t` itself without torchrun."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    buf = _on_backend(t.contiguous())
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    return torch.cat(parts).to(t.device)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `t` over ranks in place with `op` ("sum", "max" or "min"); returns `t`, the same on
    every rank.

    Max and min are exact in any order; so is a sum of integers, or of floats where every
    position is nonzero on at most one rank."""
    if dist.is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        buf = _on_backend(t)
        dist.all_reduce(buf, op=ops[op])
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s values, in place; returns `t`."""
    if dist.is_initialized():
        dist.broadcast(t, src=src)
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
