"""Atomic training checkpoints: adapter, optimizer, scheduler, data position (the step) and every rank's RNG.

A checkpoint is the folder ``<output>/checkpoints/step-XXXXXXX``. It is written under a ``.tmp`` name and renamed
when complete, and ``<output>/checkpoints/latest`` (a one-line file, itself replaced atomically) names the newest,
so a run killed at any instant leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger("lorafusion.train")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a temp file, fsynced, renamed over it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


class LockBusy(OSError):
    """The lock file is held by another process; ``holder`` is the pid it wrote there ('' if none)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.holder = holder


def lock_file(path: str) -> int:
    """An exclusive ``flock`` on ``path`` (made if missing), held until the returned fd is closed or the process
    ends, however it ends; our pid is written into it. :class:`LockBusy` (with the holder's pid) when another
    process holds it; ImportError where there is no ``fcntl`` (Windows)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LockBusy(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _fsync_path(path: str) -> None:
    """fsync a file, or a folder's entries (where the platform allows opening a folder)."""
    if os.path.isdir(path):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # e.g. Windows cannot open a folder
            return
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def tmp_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f"step-{step:07d}.tmp")


def final_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f"step-{step:07d}")


def begin(output_dir: str, step: int) -> str:
    """Rank 0: make an empty temp folder for the checkpoint of ``step``."""
    tmp = tmp_path(output_dir, step)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def write_rank_files(tmp: str, rank: int) -> None:
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))


def write_main_files(tmp: str, model, optimizer, scheduler, state: dict, write_optimizer: bool = True) -> None:
    save_file(trainable_state(model), os.path.join(tmp, "adapter.safetensors"))
    if write_optimizer:
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    with open(os.path.join(tmp, STATE_FILE), "w") as fh:
        json.dump(state, fh, indent=1)


def commit(output_dir: str, step: int, keep: int) -> str:
    """Rank 0: rename the finished temp folder into place, point ``latest`` at it, prune old checkpoints."""
    tmp, final = tmp_path(output_dir, step), final_path(output_dir, step)
    with open(os.path.join(tmp, "COMPLETE"), "w") as fh:
        fh.write("ok\n")
    # on disk before the rename and the `latest` pointer: after a power loss `latest` must not name a checkpoint
    # whose files never reached the disk (a SIGKILL alone loses nothing the kernel already holds)
    for name in os.listdir(tmp):
        _fsync_path(os.path.join(tmp, name))
    _fsync_path(tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(checkpoints_dir(output_dir))
    atomic_write_text(os.path.join(checkpoints_dir(output_dir), "latest"), os.path.basename(final) + "\n")
    names = _step_folders(output_dir)
    older = [n for n in names if n != os.path.basename(final)]  # the checkpoint just written is always kept
    for old in older[:max(0, len(names) - keep)]:
        shutil.rmtree(os.path.join(checkpoints_dir(output_dir), old), ignore_errors=True)
    return final


def resume_hint(output_dir: str) -> str:
    """Where a rerun with ``--resume`` continues from, for the message of a run that stops on an error."""
    try:
        path = latest(output_dir)
    except CheckpointError as exc:
        return f"the latest checkpoint is unusable ({exc})"
    if path is None:
        return "no checkpoint was written yet, so a rerun starts from step 0"
    return f"rerun with --resume to continue from {path}"


def write_failed(output_dir: str, step: int, exc: BaseException) -> CheckpointError:
    """Rank 0, once writing the checkpoint of ``step`` failed (a full disk, a lost mount): its temp folder goes (a
    full disk gets the space back) and the error to raise says why, the free space, and where ``--resume`` goes on."""
    shutil.rmtree(tmp_path(output_dir, step), ignore_errors=True)
    try:
        free = f" ({shutil.disk_usage(checkpoints_dir(output_dir)).free / 2**20:.1f} MiB free there)"
    except OSError:
        free = ""
    return CheckpointError(f"could not write the checkpoint of step {step} in {checkpoints_dir(output_dir)}{free}: "
                           f"{type(exc).__name__}: {exc}; the earlier checkpoints are intact: fix the cause, then "
                           f"{resume_hint(output_dir)}")


def _step_folders(output_dir: str) -> list[str]:
    """Names of the checkpoint folders (not temp ones), oldest first (zero-padded steps sort by name)."""
    d = checkpoints_dir(output_dir)
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if n.startswith("step-") and not n.endswith(".tmp"))


def complete_checkpoints(output_dir: str) -> list[str]:
    """Names of the complete checkpoint folders (``COMPLETE`` written), oldest first."""
    d = checkpoints_dir(output_dir)
    return [n for n in _step_folders(output_dir) if os.path.isfile(os.path.join(d, n, "COMPLETE"))]


def _recovery_hint(output_dir: str, bad: str) -> str:
    others = [n for n in complete_checkpoints(output_dir) if n != os.path.basename(bad)]
    if not others:
        return "no other complete checkpoint is left"
    return (f"complete earlier checkpoints: {', '.join(others)}; to resume from one, write its name into "
            f"{os.path.join(checkpoints_dir(output_dir), 'latest')}")


def latest(output_dir: str) -> str | None:
    """The checkpoint folder ``latest`` names, or None when there is none. Without the pointer (deleted or lost),
    the newest complete checkpoint folder, with a warning: finished checkpoints are never ignored."""
    d = checkpoints_dir(output_dir)
    pointer = os.path.join(d, "latest")
    if not os.path.isfile(pointer):
        found = complete_checkpoints(output_dir)
        if not found:
            return None
        logger.warning("%s is missing; using the newest complete checkpoint, %s", pointer, found[-1])
        return os.path.join(d, found[-1])
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(d, name)
    if not name or not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise CheckpointError(f"checkpoint {path} named by {pointer} is missing or incomplete; "
                              f"{_recovery_hint(output_dir, path)}")
    return path


def _corrupt(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt or unreadable: {what}; "
                           f"{_recovery_hint(os.path.dirname(os.path.dirname(path)), path)}")


def _state_problem(state) -> str | None:
    """What is wrong with a loaded ``trainer_state.json`` (None when it has the shape a run writes)."""
    if not isinstance(state, dict):
        return f"must hold a JSON object, got {type(state).__name__} {state!r:.60}"

    def bad(key: str, value, kinds, what: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
            return f"{key!r} must be {what}, got {value!r:.60}"
        return None

    problem = bad("step", state.get("step"), int, "a non-negative integer")
    for key, kinds, what in (("total_steps", int, "a non-negative integer"),
                             ("world_size", int, "a non-negative integer"),
                             ("tokens_done", int, "a non-negative integer"),
                             ("train_time_s", (int, float), "a non-negative number"),
                             ("eval_loss_before", (int, float), "a number or null"),
                             ("eval_exact_match_before", (int, float), "a number or null")):
        if problem is None and state.get(key) is not None:
            problem = bad(key, state[key], kinds, what)
    fingerprint = state.get("data_fingerprint")
    if problem is None and fingerprint is not None and not isinstance(fingerprint, str):
        problem = f"'data_fingerprint' must be a string, got {fingerprint!r:.60}"
    return problem


def read_state(path: str) -> dict:
    """The ``trainer_state.json`` of checkpoint ``path``; a ``CheckpointError`` naming the file and the earlier
    complete checkpoints when it is missing, not JSON, or not the shape a run writes (edited by hand, say)."""
    try:
        with open(os.path.join(path, STATE_FILE)) as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise _corrupt(path, f"{STATE_FILE}: {type(exc).__name__}: {exc}") from None
    problem = _state_problem(state)
    if problem is not None:
        raise _corrupt(path, f"{STATE_FILE}: {problem}")
    return state


def load(path: str, model, optimizer, scheduler, rank: int, load_optimizer: bool = True) -> dict:
    """Restore a checkpoint into ``model`` / ``optimizer`` / ``scheduler`` and this rank's RNG; returns its state."""
    state = read_state(path)
    try:
        adapter = load_file(os.path.join(path, "adapter.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in adapter]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks trainable parameters {missing[:3]} "
                                  "(was it written by a run with another LoRA config?)")
        with torch.no_grad():
            for n, t in adapter.items():
                if n not in params:
                    raise CheckpointError(f"checkpoint {path} has parameter {n!r} that the model lacks")
                params[n].copy_(t)
        if load_optimizer:
            optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        rng_file = os.path.join(path, f"rng-rank{rank}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("checkpoint %s has no RNG state for rank %d; dropout masks will differ", path, rank)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file means a corrupt checkpoint
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    return state
