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

The chain has one preflight (run/plan.py make_plan of the born-again config): the chain's own
directory checked, generation 0 planned on the dataset, read once. Each later generation's plan
is made when it starts (its teacher is the generation before it, which only then exists) and
shares what the first one read: the dataset is read once for the whole chain.
"""
from __future__ import annotations

import io

import pandas as pd

from ..config import files as config_file
from ..config.schema import Config
from ..rundir.layout import (
    COMPRESSION,
    CONFIG,
    CURVES,
    FINAL,
    GENERATIONS,
    METRICS_CSV,
    RESULT,
    RunDir,
    checkpoint_dir_of,
    generation_name,
)
from .plan import Plan
from .results import final_table, format_table, plot_curves


def _read_csv(run: RunDir, name: str) -> pd.DataFrame:
    text = run.read_text(name)
    return pd.read_csv(io.StringIO(text)) if text is not None else pd.DataFrame()


def train_generations(cfg: Config, *, models=None, datasets=None, verbose: bool = True, plan: Plan | None = None):
    """Train cfg.distill.generations generations one after another; returns a RunResult whose
    history has one member per generation (gen0, gen1, ...) and a `generation` column. `plan`:
    the chain's preflight, already made (make_plan(cfg): generation 0's plan, its `chain` the
    chain's own); made here if None."""
    from .launch import RunResult, train_cohort
    from .plan import check_run_directory, generation_config, make_plan

    # the chain's directory is checked here: finished, or another config under the same name, is refused
    plan = plan or make_plan(cfg, models=models, datasets=datasets)
    cfg, run = plan.chain.cfg, plan.chain.run_dir
    with run.lock():
        run.write(CONFIG, config_file.dump(cfg))
        histories, reports, metrics = [], [], {}
        for g in range(cfg.distill.generations):
            child = generation_config(cfg, g, run)
            child_run = run.generation(g)
            if child_run.finished:
                if verbose:
                    print(f"generation {g}: finished earlier, kept ({child_run.path})", flush=True)
            else:
                if verbose:
                    teacher = "labels only" if g == 0 else f"taught by frozen generation {g - 1}"
                    print(f"\n=== born-again generation {g}/{cfg.distill.generations - 1}: {teacher}", flush=True)
                if g == 0:  # the preflight's plan; where its directory stands is known now, the chain locked
                    check_run_directory(plan, dry_run=False)
                    child_plan = plan
                else:  # taught by generation g - 1, which exists only now; the data are the first plan's
                    child_plan = make_plan(child, models=models, datasets=datasets, shared=plan.shared)
                train_cohort(child, models=models, datasets=datasets, verbose=verbose, plan=child_plan)
            histories.append(_read_csv(child_run, METRICS_CSV).assign(generation=g))
            reports.append(_read_csv(child_run, COMPRESSION).assign(generation=g))
            metrics = child_run.read_json(RESULT)["metrics"]

        history = _per_generation(pd.concat(histories, ignore_index=True))
        last = history[history["epoch"] == history["epoch"].max()]
        table = last[[c for c in ("generation", "model", "val_acc", "val_nll", "test_acc", "test_nll") if c in last]]
        run.write(GENERATIONS, table.to_csv(index=False))
        run.write(FINAL, final_table(history).to_csv(index=False))
        run.write(METRICS_CSV, history.to_csv(index=False))
        run.write(COMPRESSION, pd.concat(reports, ignore_index=True).to_csv(index=False))
        run.write(CURVES, plot_curves(history))
        run.write_json(RESULT, {"complete": True, "metrics": metrics})
    if verbose:
        print(f"\nfinished born-again run {cfg.run.name!r} ({run.path}):\n{format_table(table)}", flush=True)
    last_ckpt = checkpoint_dir_of(run.generation(cfg.distill.generations - 1).path)
    return RunResult(run.path, history, metrics, last_ckpt)


def _per_generation(history: pd.DataFrame) -> pd.DataFrame:
    """One model per generation, so the member is the generation (gen0, gen1, ...); the
    one-model 'ensemble' rows repeat the model's and are left out."""
    df = history[history["member"] != "ensemble"].copy()
    df["member"] = [generation_name(g) for g in df["generation"]]
    return df
