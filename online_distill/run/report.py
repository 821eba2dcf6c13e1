"""`online-distill report PATH`: rebuild the tables and plots of a run or a sweep from disk.

A run directory: metrics.csv, metrics.parquet, final.csv and curves.png from the history in its
latest checkpoint. A sweep directory (it holds sweep.yaml): trials.csv, summary.csv,
schedules.csv, best_config.yaml and the plots, from Tune's experiment state.
"""
from __future__ import annotations

import json
import posixpath

import pyarrow.fs as pafs
import yaml

from .. import storage
from ..config import ConfigError


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def latest_history(run_dir: str) -> list[dict] | None:
    """The history in the run's checkpoint with the highest epoch (None: no checkpoint has one)."""
    fs, root = _fs(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    best = None
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        path = posixpath.join(info.path, "history.json")
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        key = (data.get("epoch", -1), info.base_name)
        if best is None or key > best[0]:
            best = (key, data["history"])
    return None if best is None else best[1]


def report_run(run_dir: str, verbose: bool = True) -> dict[str, str]:
    from .results import final_table, format_table, history_frame, write_run_tables

    if not storage.exists(run_dir):
        raise ConfigError(f"path: {run_dir} does not exist; allowed: a run directory or a sweep directory")
    history = latest_history(run_dir)
    if not history:
        raise ConfigError(f"path: {run_dir} has no checkpoint with a history.json; allowed: a run directory "
                          f"(runs/NAME) or a sweep directory (runs/sweeps/NAME, with sweep.yaml)")
    df = history_frame(history)
    paths = write_run_tables(run_dir, df)
    if verbose:
        print(f"{run_dir}: {df['epoch'].max()} epochs\n{format_table(final_table(df))}\nwrote "
              + ", ".join(paths.values()), flush=True)
    return paths


def report_sweep(sweep_dir: str, verbose: bool = True):
    from ..sweep import spec as sweep_config
    from ..sweep import results as sweep_results

    raw = yaml.safe_load(storage.read_text(storage.join(sweep_dir, "sweep.yaml")))
    # the sweep is where it is now, whatever storage_path it was started with
    raw["storage_path"], raw["name"] = posixpath.dirname(sweep_dir.rstrip("/")), posixpath.basename(sweep_dir.rstrip("/"))
    spec = sweep_config.from_dict(raw, check=False)  # user builders need not be importable here
    tables = sweep_results.write(sweep_dir, spec)
    if verbose:
        print(sweep_results.describe(tables, spec) + "\nwrote " + ", ".join(
            p for p in tables.paths.values() if storage.exists(p)), flush=True)
    return tables


def report(path: str, verbose: bool = True):
    """Rebuild a sweep's or a run's tables and plots (see the module docstring)."""
    if "://" not in path:
        import os

        path = os.path.abspath(os.path.expanduser(path))
    if storage.exists(storage.join(path, "sweep.yaml")):
        return report_sweep(path, verbose)
    return report_run(path, verbose)
