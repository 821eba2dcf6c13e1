"""`online-distill` command line: train | bench | report | tune | export.

Config errors exit with status 2 and one line that names the field and what is allowed, and
where the value came from (the file and line, or the --set item). The checks that need no
registry run before torch and Ray are imported, so such a refusal takes only Python's start-up.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML file")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check the config, print what would run and what it asks for; start nothing")
    p.add_argument("--set", dest="sets", action="append", metavar="SECTION.KEY=VALUE", default=[],
                   help="override a config field, e.g. --set loss.temperature=4 (repeatable; values are YAML)")


def cmd_train(args) -> int:
    from . import config

    cfg, source = config.load_checked(args.config, args.sets)  # before torch and Ray: a refusal is quick
    from .checks import check_names  # torch, torchvision

    try:
        check_names(cfg)  # model and dataset names, what the teacher source needs (imports torch)
    except ConfigError as e:
        raise source.locate(e) from None
    if args.dry_run:
        from .run.dry_run import describe_run

        print(describe_run(cfg))
        return 0
    from .run import train  # Ray

    train(cfg)
    return 0


def cmd_report(args) -> int:
    from .run.report import report

    report(args.path)
    return 0


def cmd_bench(args) -> int:
    from .bench.overhead import bench

    for name, low in (("peers", 2), ("batch_size", 1), ("steps", 5), ("repeats", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: an integer >= {low}")
    bench(peers=args.peers, model=args.model, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats)
    return 0


def cmd_tune(args) -> int:
    from . import config
    from .sweep import spec as sweep_config

    raw = config.read_yaml(args.config, "sweep file")  # a refusal names the file and line
    overrides = config.parse_sets(args.sets)  # ... or the --set item
    where = f"sweep file {args.config!r}"  # a sweep's error may come from the file and the items together
    if args.sets:
        where += " with " + ", ".join(f"--set {s!r}" for s in args.sets)
    try:  # everything but the registry names, before torch and Ray
        spec = sweep_config.from_dict(raw, base_dir=os.path.dirname(os.path.abspath(args.config)),
                                      overrides=overrides, names=False)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", e.field) from None
    try:
        spec.check()  # the registry names (imports torch)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", e.field) from None
    if args.dry_run:
        from .run.dry_run import describe_sweep

        print(describe_sweep(spec))
        return 0
    from .sweep.driver import run_sweep  # Ray

    result = run_sweep(spec, retry_errored=args.retry_errored)
    return 0 if result.complete else 130  # Tune handled Ctrl+C itself: the sweep is resumable, not done


def cmd_bench_scale(args) -> int:
    from .bench.scale import bench_scale

    bench_scale(model=args.model, dataset=args.dataset, batch_size=args.batch_size, steps=args.steps,
                repeats=args.repeats, device=args.device, precisions=tuple(args.precision.split(",")),
                suites=tuple(args.suites.split(",")), out=args.out)
    return 0


def cmd_export(args) -> int:
    from .run.export import export

    export(args.run_dir, peer=args.peer, fmt=args.format, quantize=args.quantize, out=args.out)
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

    p = sub.add_parser("report", help="rebuild tables and plots of a finished run or sweep directory")
    p.add_argument("path")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("bench", help="step time of DML vs independent peers vs plain PyTorch, side by side")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of each measurement")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("bench-scale", help="DML vs codistillation (sync_every 1, 10, 50) and 1 vs 2 replicas, side by side")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--batch-size", type=int, default=128, help="per replica")
    p.add_argument("--steps", type=int, default=103, help="steps per measurement (3 warm-up + 100 timed)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of every measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16")
    p.add_argument("--suites", default="exchange,replicas", help="comma-separated: exchange,replicas")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    p.set_defaults(fn=cmd_bench_scale)

    p = sub.add_parser("export", help="export a trained peer (TorchScript or ONNX), checked against the original")
    p.add_argument("run_dir")
    p.add_argument("--peer", type=int, default=0)
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--quantize", action="store_true", help="also apply dynamic int8 quantization and report it")
    p.add_argument("--out", default=None, help="output file (default: inside the run directory)")
    p.set_defaults(fn=cmd_export)
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
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
