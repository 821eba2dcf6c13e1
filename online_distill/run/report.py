"""`online-distill report RUN_DIR`: rebuild the tables and plots of a run from disk: metrics.csv,
metrics.parquet, final.csv, curves.png (and per_class.csv where the last epoch's logits were
saved) from the history in its newest checkpoint. A sweep directory is sweep.results' business
(`online-distill report` dispatches: cli.cmd_report)."""
from __future__ import annotations

from ..config.schema import ConfigError
from ..rundir import checkpoint as ckpt
from ..rundir import storage
from ..rundir.layout import COMPRESSION, CONFIG, RunDir


def latest_history(run: RunDir) -> tuple[list[dict], str] | None:
    """The history in the run's checkpoint with the highest epoch, and that checkpoint."""
    best = None
    for name in run.checkpoints():
        directory = run.file(name)
        epoch = ckpt.epoch_of(directory)
        if epoch is not None and (best is None or (epoch, name) > best[0]):
            best = ((epoch, name), directory)
    return None if best is None else (ckpt.read_history(best[1]), best[1])


def report_run(path: str, verbose: bool = True, compression: bool = False) -> dict[str, str]:
    """The run's tables and plots from its newest checkpoint; with `compression`, its
    compression.csv too (what run.compression_report: false skipped). Returns what was written."""
    from .results import final_table, format_table, history_frame, write_predictions, write_run_tables

    run = RunDir(path)
    if not storage.exists(run.path):
        raise ConfigError(f"path: {run.path} does not exist; allowed: a run directory or a sweep directory")
    found = latest_history(run)
    if not found or not found[0]:
        raise ConfigError(f"path: {run.path} has no checkpoint with a history; allowed: a run directory "
                          f"(runs/NAME) or a sweep directory (runs/sweeps/NAME, with sweep.yaml)")
    history, directory = found
    df = history_frame(history)
    paths = write_run_tables(run, df)
    predictions = ckpt.read_predictions(directory)
    if predictions is not None:
        import yaml

        models = (yaml.safe_load(run.read_text(CONFIG) or "{}") or {}).get("models") or sorted(set(df["model"]))
        paths["per_class"] = write_predictions(run, predictions, models)
    sizes = None
    if compression:
        from ..config.files import load
        from .compression import format_report, write_report

        cfg = load(run.file(CONFIG))
        sizes = write_report(cfg, run, directory)
        paths["compression"] = run.file(COMPRESSION)
    if verbose:
        print(f"{run.path}: {df['epoch'].max()} epochs\n{format_table(final_table(df))}\nwrote "
              + ", ".join(paths.values()), flush=True)
        if sizes is not None:
            print(f"\nsize and CPU speed ({COMPRESSION}):\n{format_report(sizes)}", flush=True)
    return paths
