"""online_distill: online distillation and self-distillation on Ray Train, swept with Ray Tune."""
from .config import Config, ConfigError, load, with_overrides

__all__ = ["Config", "ConfigError", "load", "with_overrides", "train"]


def train(cfg: Config, **kwargs):
    """Train one cohort (see online_distill.launch.train)."""
    from .launch import train as _train

    return _train(cfg, **kwargs)
