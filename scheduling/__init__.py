"""Many fine-tuning jobs over one shared pipeline-parallel base model: the planner and the tools to judge a plan."""

from .baselines import mlora_like, sequential_ffd
from .jobs import Job, PlanParams, load_jobs, lognormal_jobs, sample_lengths
from .planner import plan
from .schedule import Microbatch, Schedule, Segment
from .simulate import CostModel, SimResult, simulate, simulate_flushed
from .verify import Violation, check, verify

__all__ = [
    "CostModel", "Job", "Microbatch", "PlanParams", "Schedule", "Segment", "SimResult", "Violation", "check",
    "load_jobs", "lognormal_jobs", "mlora_like", "plan", "sample_lengths", "sequential_ffd", "simulate",
    "simulate_flushed", "verify",
]
