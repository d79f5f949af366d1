"""Process groups for the trainer: one process, torchrun (DDP over adapter gradients) or the deepspeed launcher.

Under ``torchrun`` the model is wrapped in ``DistributedDataParallel``; DDP registers reduction hooks only for
parameters that require grad, so only the LoRA adapter gradients cross the wire. Under ``deepspeed`` the model and
optimizer go through ``deepspeed.initialize`` with the given config (ZeRO stage 2: optimizer state and gradients
partitioned); batch keys are filled in from the run config so the two never disagree. On CPU the backend is gloo.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorafusion.train.config import ConfigError

logger = logging.getLogger("lorafusion.train")


@dataclass
class DistState:
    kind: str          # none / ddp / deepspeed
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by() -> str:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        # the deepspeed launcher sets these; torchrun sets TORCHELASTIC_RUN_ID
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return "deepspeed"
        return "ddp"
    return "none"


def setup(requested: str, device_pref: str) -> DistState:
    kind = requested if requested != "auto" else _launched_by()
    if kind == "auto":
        kind = "none"
    want_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (got 'cuda')")
    if kind == "none":
        return DistState("none", device=torch.device("cuda" if want_cuda else "cpu"))
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        launcher = "torchrun --nproc_per_node N -m lorafusion train ..." if kind == "ddp" else \
            "deepspeed --num_gpus N --module lorafusion train ..."
        raise ConfigError(f"train.distributed: {kind!r} needs the launcher's environment ({', '.join(missing)} "
                          f"unset): start with `{launcher}`, or set train.distributed to none (got {kind!r})")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if want_cuda else "gloo"
    if want_cuda:
        torch.cuda.set_device(local)
    if kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend)
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    logger.info("distributed: %s, rank %d of %d, backend %s", kind, rank, world, backend)
    return DistState(kind, dist.get_rank(), dist.get_world_size(), local, device)


def barrier(ds: DistState) -> None:
    if ds.kind != "none":
        dist.barrier()


def any_flag(ds: DistState, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (signals must stop all ranks at the same step)."""
    if ds.kind == "none":
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ds.device if ds.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(ds: DistState, obj):
    if ds.kind == "none":
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, ds: DistState) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ds.local_rank] if ds.device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=False)


def deepspeed_config(path: str | None, micro: int, grad_accum: int, global_batch: int, max_grad_norm: float,
                     precision: str) -> dict:
    cfg: dict = {}
    if path is not None:
        with open(path) as fh:
            cfg = json.load(fh)
    cfg.setdefault("zero_optimization", {"stage": 2})
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = global_batch
    cfg["gradient_clipping"] = max_grad_norm
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    return cfg


def wrap_deepspeed(model, optimizer, ds_cfg: dict):
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                   model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad])
    return engine, optimizer


def cleanup(ds: DistState) -> None:
    if ds.kind != "none" and dist.is_initialized():
        dist.destroy_process_group()
