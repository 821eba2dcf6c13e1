"""online_distill: online distillation and self-distillation on Ray Train, swept with Ray Tune.

    from online_distill import load, check, train, load_sweep, run_sweep

Importing the package imports only the config (no torch, no Ray): the CLI refuses bad input
before anything heavy is loaded. The rest is imported when first called.
"""
from .config.files import load
from .config.schema import Config, ConfigError, with_overrides

__all__ = ["Config", "ConfigError", "load", "with_overrides", "check", "train", "load_sweep", "run_sweep"]


def check(cfg: Config, models=None, datasets=None) -> Config:
    """Every check a config gets before a run (online_distill.run.checks.check)."""
    from .run.checks import check as _check

    return _check(cfg, models, datasets)


def train(cfg: Config, **kwargs):
    """Train one cohort, or a born-again chain (online_distill.run.train)."""
    from .run import train as _train

    return _train(cfg, **kwargs)


def load_sweep(path: str, overrides=None, **kwargs):
    """Read and check a sweep file (online_distill.sweep.driver.load_sweep)."""
    from .sweep.driver import load_sweep as _load

    return _load(path, overrides, **kwargs)


def run_sweep(spec, **kwargs):
    """Run or resume a sweep (online_distill.sweep.driver.run_sweep)."""
    from .sweep.driver import run_sweep as _run

    return _run(spec, **kwargs)
