"""`online-distill` command line: train | bench | report | tune | export | generate.

Config errors exit with status 2 and one line that names the field and what is allowed, and
where the value came from (the file and line, or the --set item). The checks that need no
registry run before torch and Ray are imported, so such a refusal takes only Python's start-up.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config.schema import ConfigError
from .errors import NotRetryable, RunLocked


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check the config, print what would run and what it asks for; start nothing")
    p.add_argument("--set", dest="sets", action="append", metavar="SECTION.KEY=VALUE", default=[],
                   help="override a config field, e.g. --set loss.temperature=4 (repeatable; values are YAML)")


def cmd_train(args) -> int:
    from .config import files as config

    cfg, source = config.load_checked(args.config, args.sets)  # before torch and Ray: a refusal is quick
    lock = _hold_the_run(cfg, source, dry_run=args.dry_run)  # a second run of the same name: refused at once
    from .run.plan import make_plan  # torch

    try:
        plan = make_plan(cfg, dry_run=args.dry_run)  # every check, once; the same for the run and its dry run
    except ConfigError as e:
        if lock is not None:
            lock.release()
        raise source.locate(e) from None
    plan.lock = lock
    if args.dry_run:
        from .run.dry_run import describe_run

        print(describe_run(plan))
        return 0
    if cfg.distill.mode == "born_again":  # the chain's plan (generation 0's) is kept: the data read once in all
        from .run.generations import train_generations

        train_generations(plan.chain.cfg, plan=plan)
        return 0
    from .run.launch import train_cohort  # Ray

    train_cohort(plan.cfg, plan=plan)
    return 0


def _hold_the_run(cfg, source, *, dry_run: bool):
    """Take the run's lock before anything heavy is imported, so a second run of the same name is
    refused in about a second (a dry run only looks). A born-again chain locks its own directory."""
    from .rundir.layout import RunDir

    lock = RunDir.of(cfg).lock()
    holder = lock.holder()
    if holder is not None:
        raise source.locate(ConfigError(lock.refusal(holder), "run.name"))
    if dry_run or cfg.distill.mode == "born_again":
        return None
    taken = lock.acquire()
    if taken:
        print(taken, file=sys.stderr, flush=True)
    return lock


def cmd_report(args) -> int:
    from .rundir import storage

    path = storage.absolute(args.path)
    if storage.exists(storage.join(path, "sweep.yaml")):
        from .sweep.results import report_sweep

        report_sweep(path)
    else:
        from .run.report import report_run

        report_run(path, compression=args.compression)
    return 0


def cmd_bench(args) -> int:
    from .run.bench import bench

    for name, low in (("peers", 2), ("batch_size", 1), ("steps", 5), ("repeats", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: an integer >= {low}")
    bench(peers=args.peers, model=args.model, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats)
    return 0


def cmd_tune(args) -> int:
    from .config import files as config
    from .sweep import spec as sweep_config

    raw = config.read_yaml(args.config, "sweep file")  # a refusal names the file and line
    overrides = config.parse_sets(args.sets)  # ... or the --set item
    where = f"sweep file {args.config!r}"  # a sweep's error may come from the file and the items together
    if args.sets:
        where += " with " + ", ".join(f"--set {s!r}" for s in args.sets)
    from .sweep.plan import plan_sweep

    try:  # the sweep's one preflight: its fields first (before torch and Ray), then a plan per trial config
        spec = sweep_config.from_dict(raw, base_dir=os.path.dirname(os.path.abspath(args.config)),
                                      overrides=overrides, check=False)
        plan = plan_sweep(spec, dry_run=args.dry_run)  # the same for the sweep and its dry run
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", e.field) from None
    if args.dry_run:
        from .sweep.spec import describe

        print("\n".join([describe(plan.spec), *plan.notes]))
        return 0
    from .sweep.driver import run_sweep  # Ray

    result = run_sweep(plan.spec, retry_errored=args.retry_errored, plan=plan)
    return 0 if result.complete else 130  # Tune handled Ctrl+C itself: the sweep is resumable, not done


def cmd_export(args) -> int:
    from .run.export import export

    export(args.run_dir, peer=args.peer, fmt=args.format, quantize=args.quantize, out=args.out)
    return 0


def cmd_generate(args) -> int:
    from .models.generate import Sampling
    from .run.sample import generate_from_run

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)
    outs = generate_from_run(args.run_dir, args.prompt, sampling, peer=args.peer, seed=args.seed, num=args.num)
    for prompt, texts in zip(args.prompt, outs):
        for text in texts:
            print(f"{prompt}\033[1m{text}\033[0m" if sys.stdout.isatty() else prompt + text)
            print("---")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-distill", description="Online and self-distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one cohort from a run config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="run a Ray Tune sweep from tune_configs/NAME.yaml")
    _add_config_args(p)
    p.add_argument("--retry-errored", action="store_true", help="when resuming, rerun trials that errored")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("report", help="rebuild tables and plots of a finished run or sweep directory",
                       description="Rebuild, from what is on disk, a run's tables and plots (the metrics table, "
                                   "the final and per-class tables, the curves: from the history and logits in its "
                                   "newest checkpoint) or a sweep's (trials, summary, schedules, the best setting "
                                   "as a run config, the plots: from Tune's experiment state). Nothing is trained.")
    p.add_argument("path", help="a run directory (runs/NAME) or a sweep directory (runs/sweeps/NAME, with sweep.yaml)")
    p.add_argument("--compression", action="store_true",
                   help="a run: also measure its compression report (size, CPU latency, test accuracy of every "
                        "student and teacher) from its newest checkpoint, as a run does at its end unless "
                        "run.compression_report is false")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("bench", help="step time of DML vs independent peers vs plain PyTorch, side by side")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of each measurement")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("export", help="export a trained peer (TorchScript or ONNX), checked against the original")
    p.add_argument("run_dir")
    p.add_argument("--peer", type=int, default=0)
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--quantize", action="store_true", help="also apply dynamic int8 quantization and report it")
    p.add_argument("--out", default=None, help="output file (default: inside the run directory)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("generate", help="print continuations of a prompt by a trained language-model peer")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for several)")
    p.add_argument("--peer", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: all)")
    p.add_argument("--num", type=int, default=1, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same continuations")
    p.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .run.env import use_our_lines_env

    use_our_lines_env()  # before anything imports Ray
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"online-distill: config error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # always one line
        return 2
    except NotRetryable as e:  # the run ended on what a retry cannot fix: one paragraph, the rest in the log
        where = f" (details: {e.log_path})" if getattr(e, "log_path", None) else ""
        print(f"online-distill: {type(e).__name__}: {' '.join(str(e).splitlines())}{where}", file=sys.stderr)
        return 2 if isinstance(e, RunLocked) else 1
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
