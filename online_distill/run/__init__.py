"""The driver side of one run: its preflight plan, made once (plan: every check, the data read
once, the run's lock, where it resumes), then the cohort in this process or a Ray Train worker
group (launch, in_process, failures), chains of runs (generations: born-again), what a run
leaves (results, compression, export, report), resuming (resume) and `--dry-run` (dry_run)."""


def train(cfg, *, models: dict | None = None, datasets: dict | None = None, verbose: bool = True):
    """Train one cohort, or for distill.mode 'born_again' one generation after another (each an
    ordinary run). `models` / `datasets` add user builders by name. Either way one preflight
    (plan.make_plan) checks everything and reads the dataset once. Returns a RunResult."""
    from .generations import train_generations
    from .launch import train_cohort

    if cfg.distill.mode != "born_again":
        return train_cohort(cfg, models=models, datasets=datasets, verbose=verbose)
    return train_generations(cfg, models=models, datasets=datasets, verbose=verbose)


def preflight(cfg, *, models: dict | None = None, datasets: dict | None = None, dry_run: bool = False):
    """The preflight of one run (run.plan.make_plan): every check, nothing started."""
    from .plan import make_plan

    return make_plan(cfg, models=models, datasets=datasets, dry_run=dry_run)
