"""``lorafusion train``: LoRA fine-tuning from one command (config, data, trainer, checkpoints, launchers).

    from lorafusion.train import load_config, run_training
    summary = run_training(load_config("configs/default.yaml", {"train": {"max_steps": 10}}))
"""
from lorafusion.train.config import ConfigError, RunConfig, load_config, parse_overrides

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_overrides", "run_training"]


def run_training(cfg, resume: bool = False):
    from lorafusion.train.trainer import run_training as _run

    return _run(cfg, resume)
