"""A multi-tenant job queue that feeds the co-training executor: tenants submit LoRA jobs against one base model, a
worker takes the pending jobs in fair batches and co-trains each batch over the shared base (``scheduling.executor``).

    lorafusion queue init   --queue Q --config queue.yaml      # the base model and the executor's settings
    lorafusion queue submit --queue Q --tenant alice job.yaml   # prints the job id
    lorafusion queue status --queue Q [--json]
    lorafusion queue cancel --queue Q JOB_ID                    # a pending job
    lorafusion queue retry  --queue Q JOB_ID                    # a failed or cancelled job, back to pending
    lorafusion queue work   --queue Q [--once] [--poll 10]      # run batches until the queue is empty (--poll: wait)

The queue is a folder (a local or shared file system):

    Q/queue.yaml                 the settings fixed at init (base model, capacity, padding, stages, precision, ...)
    Q/jobs/<id>/job.yaml         the job as submitted, its data files copied in (a job never changes once queued)
    Q/jobs/<id>/state.json       pending / running / done / failed / cancelled, its tenant, batch, times, result
    Q/jobs/<id>/adapter/         the trained adapter (a PEFT folder), once done
    Q/batches/<batch>/           one co-training run (``lorafusion cotrain``'s output folder, resumable)

Every change of state happens under an exclusive lock on ``Q/.lock`` and is written atomically, so several
submitters and workers may share one queue. A job is checked in full when it is submitted (its keys and values,
its data tokenized with the base model's tokenizer against the capacity): a bad job is refused then, with the
reason, instead of failing a batch later. A worker takes at most ``max_jobs_per_batch`` pending jobs of the highest
priority pending (``submit --priority``, default 0), round-robin over their tenants, the one served longest ago
first, the rotation carried over from batch to batch (one tenant's hundred jobs do not starve another's one).
``max_queued_per_tenant`` caps the jobs a tenant may have pending or running at once. A batch whose worker died (its ``.worker`` lock is free) is resumed from its last
checkpoint by the next worker; a batch that fails ends its jobs ``failed``, and ``retry`` puts them back in line.
With ``pipeline_processes: S`` (= ``stages``) a worker runs each batch pipeline-parallel, one process per stage,
under ``torch.distributed.run`` (``scheduling.pipeline``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass

from lorafusion.train.checkpoint import atomic_write_json, atomic_write_text

logger = logging.getLogger("lorafusion.queue")

STATES = ("pending", "running", "done", "failed", "cancelled")  # and "corrupt": a state file that cannot be read
QUEUE_KEYS = ("model", "capacity", "pad_multiple", "stages", "target_modules", "seed", "precision", "device",
              "backend", "save_every", "keep_checkpoints", "num_threads", "max_jobs_per_batch", "pipeline_processes",
              "max_queued_per_tenant")
# the queue's and the worker's own, not the executor's
WORKER_KEYS = ("max_jobs_per_batch", "pipeline_processes", "max_queued_per_tenant")
PRIORITY_RANGE = (-1000, 1000)
_TENANT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class QueueError(RuntimeError):
    """A queue operation cannot be done; the message says why."""


def _check_priority(priority) -> None:
    lo, hi = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not lo <= priority <= hi:
        raise QueueError(f"--priority must be an integer from {lo} to {hi} (higher runs first), got {priority!r}")


def _priority(state: dict) -> int:
    """A job's priority (0 for a job queued before priorities were kept)."""
    p = state.get("priority", 0)
    return p if isinstance(p, int) and not isinstance(p, bool) else 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def _locked(queue: str):
    """The queue's exclusive lock, for every read-modify-write of job states."""
    import fcntl

    fd = os.open(os.path.join(queue, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _claim(batch_dir: str) -> int | None:
    """The worker lock of a batch (``<batch>/.worker``), held for as long as a worker runs the batch: its fd, or
    None when a live worker holds it. A worker that dies releases it with its process, however it dies."""
    from lorafusion.train.checkpoint import LockBusy, lock_file

    try:
        return lock_file(os.path.join(batch_dir, ".worker"))
    except LockBusy:
        return None


@dataclass
class Queue:
    path: str

    # -- set-up
    @classmethod
    def init(cls, path: str, config_path: str) -> "Queue":
        """Make queue ``path`` with the settings of ``config_path`` (the top-level keys of a cotrain config, no
        jobs, no output_dir, plus ``max_jobs_per_batch``)."""
        import yaml

        from lorafusion.train.config import ConfigError, read_yaml_mapping

        if os.path.exists(os.path.join(path, "queue.yaml")):
            raise QueueError(f"--queue {path} is a queue already (it holds queue.yaml)")
        settings = read_yaml_mapping(config_path)
        unknown = sorted(set(settings) - set(QUEUE_KEYS))
        if unknown:
            raise ConfigError(f"unknown queue config key {unknown[0]!r} (known: {', '.join(QUEUE_KEYS)})")
        model = settings.get("model")
        if isinstance(model, str) and model and not model.startswith("builtin:"):
            # read relative to the config file, stored absolute: every worker, wherever it starts, finds it
            settings["model"] = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(config_path)), model))
        q = cls(path)
        q._check_settings(settings)
        try:
            os.makedirs(os.path.join(path, "jobs"), exist_ok=True)
            os.makedirs(os.path.join(path, "batches"), exist_ok=True)
            atomic_write_text(os.path.join(path, "queue.yaml"), yaml.safe_dump(settings, sort_keys=False))
        except OSError as exc:
            raise QueueError(f"--queue {path}: cannot make the queue there: {exc.strerror or exc}") from None
        return q

    def __post_init__(self):
        self.path = os.path.abspath(self.path)

    def _check_settings(self, settings: dict) -> None:
        from lorafusion.train.config import ConfigError

        per_batch = settings.get("max_jobs_per_batch", 8)
        if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 1:
            raise ConfigError(f"max_jobs_per_batch: must be a positive integer (got {per_batch!r})")
        quota = settings.get("max_queued_per_tenant")
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
            raise ConfigError(f"max_queued_per_tenant: must be a positive integer, or null for no cap (got {quota!r})")
        procs = settings.get("pipeline_processes", 1)
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ConfigError(f"pipeline_processes: must be a positive integer (got {procs!r})")
        if procs > 1 and procs != settings.get("stages", 1):
            raise ConfigError(f"pipeline_processes: must equal stages ({settings.get('stages', 1)}), one process per "
                              f"pipeline stage (got {procs!r})")
        cfg = self._cotrain_config([], settings)  # every other key checked as the executor checks it
        self._check_on_model(cfg, procs)

    @staticmethod
    def _check_on_model(cfg, processes: int = 1) -> None:
        """What a batch would meet first, checked now on the real tokenizer and a weightless (meta) copy of the
        model: the model folder, the device, the backend, and that every job's target_modules match wrapped
        linears. A setting or job that would fail every batch is refused before it is stored."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from lorafusion.multi import MultiLoRAModel
        from lorafusion.multi.backends import get_multi_backend
        from scheduling.executor import PRECISIONS, CoTrainer, CoTrainError

        ct = CoTrainer(cfg)
        ct.load_tokenizer()  # the model folder and its tokenizer
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise QueueError("device: cuda, but no CUDA device is available here")
        try:
            get_multi_backend(cfg.device, cfg.backend, PRECISIONS[cfg.precision])
        except (RuntimeError, TypeError) as exc:
            raise QueueError(f"backend: {exc}") from None
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ct.model_path()))
            mm = MultiLoRAModel(model, target_modules=cfg.target_modules or "all-linear")
            for j in cfg.jobs:
                mm.add_adapter(j.adapter, r=j.r, alpha=j.alpha, target_modules=j.target_modules)
        except ValueError as exc:
            raise CoTrainError(f"target_modules: {exc}") from None
        if processes > 1:  # what the pipeline's stages need: a decoder to split, and a GPU each
            from scheduling.pipeline import _decoder, split_layers

            _, layers = _decoder(model, cfg.model)
            try:
                split_layers(len(layers), processes)
            except ValueError as exc:
                raise QueueError(f"pipeline_processes: {exc} ({cfg.model})") from None
            if cfg.device == "cuda" and torch.cuda.device_count() < processes:
                raise QueueError(f"pipeline_processes: {processes} stages need one GPU each, and this machine has "
                                 f"{torch.cuda.device_count()}")

    def settings(self) -> dict:
        import yaml

        path = os.path.join(self.path, "queue.yaml")
        if not os.path.isfile(path):
            raise QueueError(f"--queue {self.path} is not a queue (no queue.yaml; make one with lorafusion queue init)")
        for sub in ("jobs", "batches"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        with open(path) as fh:
            return yaml.safe_load(fh) or {}

    def _cotrain_config(self, jobs: list, settings: dict | None = None, output_dir: str = "unused"):
        from scheduling.executor import load_cotrain_config

        s = dict(self.settings() if settings is None else settings)
        for key in WORKER_KEYS:
            s.pop(key, None)
        return load_cotrain_config(None, {**s, "output_dir": output_dir,
                                          "jobs": jobs or [{"adapter": "probe", "data": "builtin:lowercase"}]})

    # -- jobs
    def _job_dir(self, job_id: str) -> str:
        return os.path.join(self.path, "jobs", job_id)

    def state(self, job_id: str) -> dict:
        path = os.path.join(self._job_dir(job_id), "state.json")
        if not os.path.isfile(path) or job_id.endswith(".tmp") or os.sep in job_id or job_id in (".", ".."):
            raise QueueError(f"no job {job_id!r} in queue {self.path}")
        try:
            with open(path) as fh:
                st = json.load(fh)
        except ValueError as exc:
            raise QueueError(f"job {job_id}: its state file {path} is corrupt ({exc})") from None
        if not isinstance(st, dict) or st.get("state") not in STATES:
            raise QueueError(f"job {job_id}: its state file {path} is corrupt (no valid state)")
        return st

    def _set_state(self, job_id: str, **changes) -> dict:
        st = {**self.state(job_id), **changes, "updated": _now()}
        atomic_write_json(os.path.join(self._job_dir(job_id), "state.json"), st)
        return st

    def jobs(self) -> list[dict]:
        """Every job's state (with its ``id``), in order of submission. A job folder whose state cannot be read is
        listed as ``corrupt`` (with why) and never scheduled; the ``.tmp`` folder of a submit that did not finish is
        not a job."""
        root = os.path.join(self.path, "jobs")
        out = []
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if name.endswith(".tmp") or not os.path.isdir(os.path.join(root, name)):
                continue
            path = os.path.join(root, name, "state.json")
            try:
                with open(path) as fh:
                    st = json.load(fh)
                if not isinstance(st, dict) or st.get("state") not in STATES or not isinstance(st.get("seq"), int):
                    raise ValueError(f"not a job state: {str(st)[:80]}")
            except (OSError, ValueError) as exc:
                st = {"state": "corrupt", "seq": 2**62, "tenant": "?", "name": name, "batch": None,
                      "error": f"{path}: {type(exc).__name__}: {exc}"}
            out.append({**st, "id": name})
        return sorted(out, key=lambda s: (s["seq"], s["id"]))

    def submit(self, tenant: str, job_file: str, priority: int = 0) -> str:
        """Queue the job of ``job_file`` (a YAML mapping of cotrain job keys; ``adapter`` is optional and only names
        the job) for ``tenant``; returns its id. The job is checked in full first (keys, values, data against the
        base model's tokenizer and the capacity); nothing is queued when it is refused. Batches take the jobs of
        the highest ``priority`` pending first (an integer in ``PRIORITY_RANGE``)."""
        import yaml

        from lorafusion.train.config import ConfigError, read_yaml_mapping
        from scheduling.executor import CoTrainer, CoTrainError, read_samples, tokenize_job
        from scheduling.jobs import PlanParams

        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise QueueError("--tenant must be 1-64 letters, digits, '_' or '-', starting with a letter, got "
                             f"{tenant!r}")
        _check_priority(priority)
        settings = self.settings()
        self._check_quota(tenant, settings)  # early, before the data is read (again under the lock below)
        spec = read_yaml_mapping(job_file, "job file")
        name = str(spec.get("adapter") or os.path.splitext(os.path.basename(job_file))[0])
        job_id = f"{tenant}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"  # an adapter name
        base = os.path.dirname(os.path.abspath(job_file))
        spec = {**spec, "adapter": "job"}
        for key in ("data", "eval_data"):  # relative to the job file, as in a cotrain config
            v = spec.get(key)
            if isinstance(v, str) and v and not v.startswith("builtin:") and not os.path.isabs(v):
                spec[key] = os.path.normpath(os.path.join(base, v))
        try:
            cfg = self._cotrain_config([spec], settings)  # keys and values: a ConfigError naming them
        except ConfigError as exc:
            msg = str(exc).replace("jobs[0] (job).", "").replace("jobs[0].", "").replace("in jobs[0]:", "in a job:")
            raise ConfigError(f"job file {job_file}: {msg}") from None
        j = cfg.jobs[0]
        folder = self._job_dir(job_id)
        tmp = folder + ".tmp"  # never listed as a job; a submit killed before the rename leaves only this
        originals: dict[str, str] = {}
        try:
            os.makedirs(tmp)
            for key in ("data", "eval_data"):  # copied in: a queued job's data never changes under it
                v = getattr(j, key)
                if v and not v.startswith("builtin:"):
                    if not os.path.isfile(v):
                        raise QueueError(f"job {job_file} refused: {key}: {v} is not a file")
                    dest = f"{key}.jsonl"
                    shutil.copyfile(v, os.path.join(tmp, dest))
                    spec[key] = dest
                    originals[os.path.join(tmp, dest)] = v
                    setattr(j, key, os.path.join(tmp, dest))  # the copies are what is checked and run
            tokenizer = CoTrainer(cfg).load_tokenizer()
            params = PlanParams(cfg.capacity, cfg.pad_multiple, cfg.stages)
            try:
                tokenize_job(j, tokenizer, params, "job")  # the data: lengths, records, batch size against it
                if j.eval_data:
                    read_samples(j.eval_data, tokenizer, cfg.capacity, "job.eval_data", j.max_eval_samples,
                                 default_split="eval")
                self._check_on_model(cfg)  # its target_modules on the model
            except (CoTrainError, ValueError) as exc:
                msg = str(exc)
                for copy, orig in originals.items():
                    msg = msg.replace(copy, orig)
                raise QueueError(f"job {job_file} refused: {msg}") from None
            with open(os.path.join(tmp, "job.yaml"), "w") as fh:
                yaml.safe_dump({k: v for k, v in spec.items() if k != "adapter"}, fh, sort_keys=False)
            with _locked(self.path):
                self._check_quota(tenant, settings)
                seq = 1 + max((x["seq"] for x in self.jobs() if x["state"] != "corrupt"), default=0)
                atomic_write_json(os.path.join(tmp, "state.json"), {
                    "state": "pending", "tenant": tenant, "name": name, "seq": seq, "priority": priority,
                    "submitted": _now(), "updated": _now(), "batch": None, "result": None, "error": None})
                os.rename(tmp, folder)
        except OSError as exc:
            raise QueueError(f"job {job_file}: cannot queue it in {self.path}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("queued job %s (%s) for tenant %s", job_id, name, tenant)
        return job_id

    def _check_quota(self, tenant: str, settings: dict) -> None:
        cap = settings.get("max_queued_per_tenant")
        if cap is None:
            return
        held = sum(1 for x in self.jobs() if x["tenant"] == tenant and x["state"] in ("pending", "running"))
        if held >= cap:
            raise QueueError(f"tenant {tenant} has {held} jobs pending or running, the most max_queued_per_tenant "
                             f"({cap}) allows; submit again when one ends, or cancel a pending one")

    def set_priority(self, job_id: str, priority: int) -> None:
        """A pending job's priority (it keeps its place of submission among the jobs of its new priority)."""
        _check_priority(priority)
        with _locked(self.path):
            st = self.state(job_id)
            if st["state"] != "pending":
                raise QueueError(f"job {job_id} is {st['state']}; only a pending job's priority can be changed")
            self._set_state(job_id, priority=priority)

    def cancel(self, job_id: str) -> None:
        with _locked(self.path):
            st = self.state(job_id)
            if st["state"] != "pending":
                raise QueueError(f"job {job_id} is {st['state']}"
                                 + (f" in batch {st['batch']}" if st["state"] == "running" else "")
                                 + "; only a pending job can be cancelled")
            self._set_state(job_id, state="cancelled")

    def retry(self, job_id: str) -> None:
        """A failed or cancelled job back to pending, in its place of submission."""
        with _locked(self.path):
            st = self.state(job_id)
            if st["state"] not in ("failed", "cancelled"):
                raise QueueError(f"job {job_id} is {st['state']}; only a failed or cancelled job can be retried")
            self._set_state(job_id, state="pending", batch=None, error=None)

    # -- the worker
    def _job_spec(self, job_id: str) -> dict:
        import yaml

        with open(os.path.join(self._job_dir(job_id), "job.yaml")) as fh:
            spec = yaml.safe_load(fh)
        if not isinstance(spec, dict):
            raise QueueError(f"job {job_id}: job.yaml does not hold a mapping of job keys")
        for key in ("data", "eval_data"):
            v = spec.get(key)
            if isinstance(v, str) and v and not v.startswith("builtin:"):
                spec[key] = os.path.join(self._job_dir(job_id), v)
        return {**spec, "adapter": job_id}

    def _served(self) -> dict:
        path = os.path.join(self.path, "tenants.json")
        try:
            with open(path) as fh:
                served = json.load(fh)
            return served if isinstance(served, dict) else {}
        except (OSError, ValueError):
            return {}

    def _take_batch(self) -> tuple[str, list[str], bool, int] | None:
        """Under the lock: a batch whose worker died (to resume, with its jobs in the batch's own order), else a
        new batch of pending jobs, with its worker lock held (the fd); None when there is nothing to run.

        A new batch holds pending jobs of one priority, the highest pending (a batch's jobs train together and end
        together, so a lower-priority job would only slow a higher one's batch down). It is filled round-robin
        over the tenants with jobs of that priority, the tenant served longest ago (or never) first, each tenant's
        jobs in order of submission; ``tenants.json`` remembers when each tenant was last served, so the rotation
        carries over from batch to batch (with one job a batch, tenants alternate)."""
        per_batch = self.settings().get("max_jobs_per_batch", 8)
        with _locked(self.path):
            states = self.jobs()
            running = sorted({s["batch"] for s in states if s["state"] == "running"})
            for batch in running:
                bdir = os.path.join(self.path, "batches", batch)
                fd = _claim(bdir)
                if fd is not None:
                    try:
                        with open(os.path.join(bdir, "jobs.json")) as fh:
                            ids = json.load(fh)
                    except (OSError, ValueError):
                        ids = [s["id"] for s in states if s["batch"] == batch]
                    return batch, ids, True, fd
            pending: dict[str, list[str]] = {}
            first: dict[str, int] = {}
            top = max((_priority(s) for s in states if s["state"] == "pending"), default=0)
            for s in states:
                if s["state"] == "pending" and _priority(s) == top:
                    pending.setdefault(s["tenant"], []).append(s["id"])
                    first.setdefault(s["tenant"], s["seq"])
            served = self._served()
            order = sorted(pending, key=lambda t: (served.get(t, -1), first[t]))
            taken: list[str] = []
            while len(taken) < per_batch and any(pending[t] for t in order):
                for t in order:
                    if pending[t] and len(taken) < per_batch:
                        taken.append(pending[t].pop(0))
            if not taken:
                return None
            tick = 1 + max(served.values(), default=0)
            for k, t in enumerate(order):  # served in this order, this round
                if any(self._tenant_of(states, j) == t for j in taken):
                    served[t] = tick + k
            batch = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            bdir = os.path.join(self.path, "batches", batch)
            os.makedirs(bdir)
            fd = _claim(bdir)
            atomic_write_json(os.path.join(bdir, "jobs.json"), taken)
            for job_id in taken:
                self._set_state(job_id, state="running", batch=batch, started=_now())
            atomic_write_json(os.path.join(self.path, "tenants.json"), served)
            return batch, taken, False, fd

    @staticmethod
    def _tenant_of(states: list[dict], job_id: str) -> str:
        return next(s["tenant"] for s in states if s["id"] == job_id)

    def run_batch(self, batch: str, job_ids: list[str], resume: bool, claim: int) -> dict:
        """Co-train one batch (its worker lock ``claim`` held, released at the end); each job ends done (its adapter
        copied into its folder) or failed (the reason)."""
        try:
            return self._run_batch(batch, job_ids, resume, claim)
        finally:
            os.close(claim)

    def _run_pipeline(self, batch: str, cfg, resume: bool, claim: int, processes: int) -> dict:
        """The batch run pipeline-parallel: ``torch.distributed.run`` (torchrun) with one process per stage, its
        output appended to ``batches/<batch>/pipeline.log``. The launcher runs in a session of its own (a signal
        reaches it once, passed on by this worker), holds the batch's worker lock too, so a batch is not resumed
        while its launcher is alive, and gets SIGTERM if this worker dies (Linux); its stages stop, checkpointed,
        if it dies."""
        import signal
        import subprocess
        import sys

        from scheduling.pipeline import die_with_parent

        from lorafusion.train.trainer import Terminated

        folder = os.path.join(self.path, "batches", batch)
        config = os.path.join(folder, "cotrain.json")
        atomic_write_json(config, cfg.to_dict())
        self._wait_for_run(cfg.output_dir)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "lorafusion", "cotrain", "--config", config] + (["--resume"] if resume else [])
        log = os.path.join(folder, "pipeline.log")
        with open(log, "ab") as fh:
            start = fh.tell()  # this run's output starts here
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, pass_fds=(claim,),
                                    start_new_session=True, preexec_fn=die_with_parent)
            try:
                rc = proc.wait()
            except KeyboardInterrupt as exc:  # the run checkpoints and stops; the batch stays running
                proc.send_signal(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
                proc.wait()
                raise
        summary = os.path.join(cfg.output_dir, "summary.json")
        if rc == 0 and os.path.isfile(summary):
            with open(summary) as fh:
                return json.load(fh)
        with open(log, "rb") as fh:
            fh.seek(start)
            said = [line.strip() for line in fh.read().decode(errors="replace").splitlines()
                    if line.startswith("lorafusion cotrain:")]
        last = said[-1] if said else ""
        # stopped by a signal (to this worker, the launcher or a stage): torchrun exits 1 even when its stages
        # stopped cleanly, checkpointed; the next worker resumes the batch
        if rc == 0 or last.startswith(("lorafusion cotrain: stopped", "lorafusion cotrain: terminated",
                                       "lorafusion cotrain: interrupted")):
            return {"stopped": last or "signal"}
        raise QueueError(f"{last or f'the pipeline run exited {rc}'} (log: {log})")

    @staticmethod
    def _wait_for_run(run_dir: str, timeout: float = 300.0) -> None:
        """Wait while another process holds the run folder's lock: the stages of a run whose launcher was killed
        stop, checkpointed, within a few microbatches."""
        from lorafusion.train.checkpoint import LockBusy, lock_file

        lock = os.path.join(run_dir, ".lock")
        deadline = time.monotonic() + timeout
        while os.path.exists(lock):
            try:
                os.close(lock_file(lock))
                return
            except ImportError:  # no flock here
                return
            except LockBusy as exc:
                if time.monotonic() > deadline:
                    raise QueueError(f"{run_dir} is still in use by pid {exc.holder or '?'} after {timeout:.0f} s; "
                                     "that run's stages outlived their launcher") from None
                time.sleep(1.0)

    def _run_batch(self, batch: str, job_ids: list[str], resume: bool, claim: int) -> dict:
        from scheduling.executor import CoTrainer

        run_dir = os.path.join(self.path, "batches", batch, "run")
        logger.info("batch %s: %s %d job(s): %s", batch, "resuming" if resume else "running", len(job_ids),
                    ", ".join(job_ids))
        try:
            cfg = self._cotrain_config([self._job_spec(j) for j in job_ids], output_dir=run_dir)
            procs = self.settings().get("pipeline_processes", 1)
            summary = (self._run_pipeline(batch, cfg, resume, claim, procs) if procs > 1 else
                       CoTrainer(cfg).run(resume=resume))
            if "stopped" in summary:  # a signal: the batch stays running, and the next worker resumes it
                return {"batch": batch, **summary}
            with _locked(self.path):
                for j in job_ids:  # idempotent: a worker killed half-way through is finished by the next one
                    dest = os.path.join(self._job_dir(j), "adapter")
                    tmp = dest + ".tmp"
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(os.path.join(run_dir, "adapters", j), tmp)
                    shutil.rmtree(dest, ignore_errors=True)
                    os.rename(tmp, dest)
                    if self.state(j)["state"] != "done":
                        self._set_state(j, state="done", finished=_now(), result=summary["jobs"][j])
        except Exception as exc:  # noqa: BLE001 (any failure of the batch ends its jobs failed, with the reason:
            reason = f"batch {batch}: {type(exc).__name__}: {exc}"  # a batch left running would block the queue)
            with _locked(self.path):
                for j in job_ids:
                    try:
                        if self.state(j)["state"] == "running":
                            self._set_state(j, state="failed", error=reason, finished=_now())
                    except (QueueError, OSError, ValueError):
                        continue
            logger.error("%s", reason)
            return {"batch": batch, "failed": reason}
        return {"batch": batch, "done": job_ids}

    def work(self, once: bool = False, poll: float = 0.0, stop=None) -> list[dict]:
        """Run batches until the queue has nothing left (``once``: one batch at most), or with ``poll`` > 0 and
        not ``once``, wait for new jobs until ``stop()`` is true. Returns what each batch did."""
        import math

        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not math.isfinite(poll) or poll < 0:
            raise QueueError(f"--poll must be a finite number of seconds >= 0, got {poll!r}")
        done = []
        while True:
            taken = self._take_batch()
            if taken is None:
                if once or poll <= 0 or (stop is not None and stop()):
                    return done
                time.sleep(poll)
                continue
            result = self.run_batch(*taken)
            done.append(result)
            if once or "stopped" in result or (stop is not None and stop()):
                return done
