"""Born-again networks (Furlanello et al. 2018): N generations in one command.

Generation 0 is the model trained on labels alone. Generation g + 1 is the same architecture
trained from scratch with frozen generation g as its teacher. Each generation is an ordinary
run in `RUN_DIR/gen{g}` (its own config.yaml, checkpoints, tables and compression report), so
every generation's results are kept and each can be rerun or inspected on its own:
generation 0 is an 'independent' run, generation g > 0 an 'offline' run whose teacher
checkpoint is generation g - 1's run directory. All generations use the same seed, hence the
same initial weights and the same batches: the teacher is the only thing that differs.

The born-again run directory gets `generations.csv` (the final row of every generation) and
`final.csv`, `metrics.csv`, `compression.csv` and `curves.png` over all generations. An
interrupted run resumes where it stopped: finished generations are kept, the running one
resumes from its last checkpoint.
"""
from __future__ import annotations

import io
import json

import pandas as pd

from .. import storage
from ..config import Config, with_overrides


def generation_config(cfg: Config, g: int, run_dir: str) -> Config:
    """Generation g of a born-again run, as an ordinary run inside the born-again run directory."""
    over: dict = {"run.storage_path": run_dir, "run.name": f"gen{g}"}
    if g == 0:
        over["distill.mode"] = "independent"
    else:
        over.update({"distill.mode": "offline", "distill.teacher_checkpoint": storage.join(run_dir, f"gen{g - 1}"),
                     "distill.teacher_peer": 0, "distill.teacher_model": None})
    return with_overrides(cfg, over)


def _read_csv(path: str) -> pd.DataFrame:
    text = storage.read_text(path)
    return pd.read_csv(io.StringIO(text)) if text is not None else pd.DataFrame()


def train_generations(cfg: Config, *, models=None, datasets=None, verbose: bool = True):
    """Train cfg.distill.generations generations one after another; returns a RunResult whose
    history has one member per generation (gen0, gen1, ...) and a `generation` column."""
    import ray.train

    from .launch import RunResult, prepare_run_dir, train_cohort
    from .results import final_table, format_table, plot_curves
    from ..teachers.frozen import find_checkpoint_dir

    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    prepare_run_dir(cfg, run_dir)  # refuses a finished run or a changed config; keeps config.yaml
    histories, reports, metrics = [], [], {}
    for g in range(cfg.distill.generations):
        child = generation_config(cfg, g, run_dir)
        child_dir = storage.join(run_dir, child.run.name)
        if storage.exists(storage.join(child_dir, "result.json")):
            if verbose:
                print(f"generation {g}: finished earlier, kept ({child_dir})", flush=True)
        else:
            if verbose:
                teacher = "labels only" if g == 0 else f"taught by frozen generation {g - 1}"
                print(f"\n=== born-again generation {g}/{cfg.distill.generations - 1}: {teacher}", flush=True)
            train_cohort(child, models=models, datasets=datasets, verbose=verbose)
        histories.append(_read_csv(storage.join(child_dir, "metrics.csv")).assign(generation=g))
        reports.append(_read_csv(storage.join(child_dir, "compression.csv")).assign(generation=g))
        metrics = json.loads(storage.read_text(storage.join(child_dir, "result.json")))["metrics"]

    history = _per_generation(pd.concat(histories, ignore_index=True))
    last = history[history["epoch"] == history["epoch"].max()]
    table = last[["generation", "model", "val_acc", "val_nll", "test_acc", "test_nll"]]
    compression = pd.concat(reports, ignore_index=True)
    storage.write_text(storage.join(run_dir, "generations.csv"), table.to_csv(index=False))
    storage.write_text(storage.join(run_dir, "final.csv"), final_table(history).to_csv(index=False))
    storage.write_text(storage.join(run_dir, "metrics.csv"), history.to_csv(index=False))
    storage.write_text(storage.join(run_dir, "compression.csv"), compression.to_csv(index=False))
    storage.write_bytes(storage.join(run_dir, "curves.png"), plot_curves(history))
    result = json.dumps({"complete": True, "metrics": metrics}, indent=1)
    storage.write_text(storage.join(run_dir, "result.json"), result)
    if verbose:
        print(f"\nfinished born-again run {cfg.run.name!r} ({run_dir}):\n{format_table(table)}", flush=True)
    last_ckpt = find_checkpoint_dir(storage.join(run_dir, f"gen{cfg.distill.generations - 1}"))
    return RunResult(run_dir, history, metrics, ray.train.Checkpoint(last_ckpt))


def _per_generation(history: pd.DataFrame) -> pd.DataFrame:
    """One model per generation, so the member is the generation (gen0, gen1, ...); the
    one-model 'ensemble' rows repeat the model's and are left out."""
    df = history[history["member"] != "ensemble"].copy()
    df["member"] = [f"gen{g}" for g in df["generation"]]
    return df
