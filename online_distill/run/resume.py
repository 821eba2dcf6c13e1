"""Where a run resumes: the newest checkpoint in its directory that is complete and loads,
whoever wrote it (a worker group, or a cohort trained in the driver's own process).

- complete: every rank that saved into it left its manifest, and every file a manifest lists is
  there at that size (checkpoint.verify);
- loads: every file a resume reads loads as the resume reads it (torch.load(weights_only=True)).

Checked on the driver before anything starts, where newer checkpoint directories that fail are
moved aside, never deleted, so the rerun can write those names again: `damaged-...` (complete
once) or `incomplete-...` (a save that never finished); when none loads among checkpoints that
were once complete, the rerun is refused. A worker group that lost a worker restarts its loop,
which finds the point again (without moving anything), so it resumes from this attempt's
newest complete checkpoint, as Ray Train would from its own.
"""
from __future__ import annotations

from ..config.schema import Config, ConfigError
from ..rundir.checkpoint import ResumePoint, find_resume_point
from ..rundir.layout import DAMAGED, INCOMPLETE, RunDir

__all__ = ["ResumePoint", "find_resume_point", "set_aside", "refusal", "start_over"]


def set_aside(run: RunDir, point: ResumePoint) -> str | None:
    """Move the newer damaged and incomplete directories aside; return the one line that says
    what was moved (None when nothing was)."""
    if not point.needs_fallback:
        return None
    said = [f"{name} is damaged ({'; '.join(problems)}), moved to {run.move_aside(name, DAMAGED)}"
            for name, problems in point.damaged.items()]
    said += [f"{name} was never completed, moved to {run.move_aside(name, INCOMPLETE)}" for name in point.incomplete]
    where = f"resuming {point.describe()}" if point.checkpoint else "starting from scratch"
    return f"resume: {'; '.join(said)}; {where} in {run.path}"


def refusal(cfg: Config, run: RunDir, point: ResumePoint) -> ConfigError:
    said = [f"{name}: {'; '.join(problems)}" for name, problems in {**point.damaged, **point.incomplete}.items()]
    return ConfigError(f"run.name: {cfg.run.name!r} cannot resume, no checkpoint in {run.path} loads "
                       f"({' | '.join(said)}). Allowed: {start_over(run, cfg.run.name)}", "run.name")


def start_over(run: RunDir, name: str | None = None) -> str:
    new = f"--set run.name={name}-2" if name else "--set run.name=<a new name>"
    # moving it away comes first: it is also right for a born-again generation, whose name the user did not choose
    return f"move {run.path} away and rerun the same command, or start over under a new run.name ({new})"


def check_resume(cfg: Config, run: RunDir) -> tuple[str | None, str | None]:
    """Refuse a run none of whose checkpoints loads (ConfigError), else set aside what stands in
    the way. Returns the line to print (None when nothing was moved) and the checkpoint directory
    the run resumes from (None: from scratch). The plan does the same in two steps (it moves
    nothing before the run holds its lock)."""
    point = find_resume_point(run, cfg.num_peers)
    if point.refused:
        raise refusal(cfg, run, point)
    return set_aside(run, point), point.checkpoint
