"""The ``kdsim`` command line. Errors print one line and exit non-zero, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EXAMPLES = textwrap.dedent("""\
    examples:
      kdsim run                                   # the default linear Gaussian simulation
      kdsim run configs/linear_rank.toml --out runs/rank
      kdsim sweep configs/sweep_n.toml --out runs/sweep_n   # rerun to resume after a kill
      kdsim plot runs/rank                        # PNGs written inside the folder
      kdsim bench                                 # the quick throughput benchmark
      kdsim config                                # every config field: meaning, default, range

    A config (TOML) names only the fields it changes; a sweep file has a [base] table
    (a config) and a [grid] table mapping dotted field names to lists, e.g.
      [grid]
      "task.n" = [16, 64, 256]
    """)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdsim", description="Monte Carlo simulator for the generalization theory of "
        "knowledge distillation.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run one simulation from a TOML config",
                         description="Run one simulation; write result.json/npz and overview.png.")
    run.add_argument("config", nargs="?", help="TOML config (omit for all defaults)")
    run.add_argument("--out", default="runs/default", help="output folder (default: runs/default)")
    run.add_argument("--no-plot", action="store_true", help="skip the figure")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw = sub.add_parser("sweep", help="run a sweep (resumable) from a TOML sweep file",
                        description="Run every point of a sweep file's [grid] over its [base] "
                        "config; finished points are stored the moment they finish and never "
                        "recomputed: rerun the same command to resume.")
    sw.add_argument("sweep_file")
    sw.add_argument("--out", required=True, help="the sweep's store folder")
    sw.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="run the points as Ray tasks: on a local Ray (no ADDRESS) or the "
                         "cluster at ADDRESS ('auto', 'ray://host:10001'); needs kdsim[ray]")
    sw.add_argument("--gpus-per-point", type=float, default=0.0,
                    help="GPUs each point asks Ray for (default 0)")
    sw.add_argument("--no-plot", action="store_true")
    sw.add_argument("--no-progress", action="store_true")
    plot = sub.add_parser("plot", help="draw the figures of a run or sweep folder")
    plot.add_argument("folder")
    bench = sub.add_parser("bench", help="the quick throughput benchmark (see benchmarks/)")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="passed on to benchmarks/throughput.py (default: --quick)")
    conf = sub.add_parser("config", help="print every config field with its meaning, default "
                          "and allowed range", description="The configuration reference, generated "
                          "from the fields themselves.")
    conf.add_argument("--markdown", action="store_true",
                      help="print it as the Markdown table of docs/config.md")
    return p


def _cmd_config(args) -> int:
    from .config import reference_markdown, reference_text
    print(reference_markdown() if args.markdown else reference_text(), end="")
    return 0


def _print_table(df) -> None:
    import pandas as pd
    with pd.option_context("display.width", 120, "display.max_columns", 12,
                           "display.float_format", lambda x: f"{x:.4g}"):
        print(df)


def _cmd_run(args) -> int:
    from . import simulate
    from .config import SimConfig, load_config
    from .simulate import DivergenceError
    cfg = load_config(args.config) if args.config else SimConfig()
    try:
        res = simulate(cfg, progress=False if args.no_progress else None)
    except DivergenceError as err:
        # keep the record of which chain blew up at which step
        import numpy as np
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "divergence.npz")
        pops = err.run.populations
        np.savez(path, diverged_T=pops.diverged_T, diverged_S=pops.diverged_S,
                 diverged_step_T=pops.diverged_step_T, diverged_step_S=pops.diverged_step_S)
        raise DivergenceError(f"{err} (which chain diverged at which step: {path})", err.run) from None
    res.save(args.out)
    _print_table(res.table())
    if res.notes:
        print("\nnotes:")
        for note in res.notes:
            print(f"  - {note}")
    meta = res.meta
    print(f"\n{meta['particle_steps']:.3g} particle-steps in {meta['engine_seconds']:.1f} s "
          f"(total {meta['total_seconds']:.1f} s); result saved in {args.out}/")
    if not args.no_plot:
        png = os.path.join(args.out, "overview.png")
        res.plot(png)
        print(f"plot written to {png}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import load_sweep_file, sweep
    base, grid = load_sweep_file(args.sweep_file)
    executor = None
    if args.ray:
        from .sweep import ray_executor
        executor = ray_executor(num_gpus=args.gpus_per_point,
                                address=None if args.ray == "local" else args.ray)
    table = sweep(base, grid, out=args.out, progress=False if args.no_progress else None,
                  executor=executor)
    fields = list(grid)
    cols = [c for c in ("gen_S", "gen_S_exact", "B0_upper", "B1_upper") if c in table]
    _print_table(table.groupby(fields)[cols].mean())
    print(f"\n{table['point'].nunique()} points x {table['dataset'].nunique()} datasets; "
          f"stored in {args.out}/")
    if not args.no_plot:
        from .plots import plot_sweep
        for path in plot_sweep(table, args.out):
            print(f"plot written to {path}")
    return 0


def _cmd_plot(args) -> int:
    from .sweep import MANIFEST, load_sweep
    if os.path.exists(os.path.join(args.folder, MANIFEST)):
        from .plots import plot_sweep
        paths = plot_sweep(load_sweep(args.folder), args.folder)
    else:
        from .result import load_result
        paths = [os.path.join(args.folder, "overview.png")]
        load_result(args.folder).plot(paths[0])
    for path in paths:
        print(f"plot written to {path}")
    return 0


def _cmd_bench(args) -> int:
    import runpy
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(here), "benchmarks", "throughput.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"benchmark script not found: {script} (kdsim bench runs "
                                "from a source checkout)")
    sys.argv = [script] + (args.args or ["--quick"])
    runpy.run_path(script, run_name="__main__")
    return 0


def entry() -> int:
    """The ``kdsim`` command: one CPU device per core (the engine spreads its population
    over them), then :func:`main`."""
    from .sharding import cpu_device_flags
    cpu_device_flags()
    return main()


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .io import ResultFileError
    from .simulate import DivergenceError
    from .sweep import SweepError
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"run": _cmd_run, "sweep": _cmd_sweep, "plot": _cmd_plot, "bench": _cmd_bench,
                "config": _cmd_config}
    try:
        return commands[args.command](args)
    except (ConfigError, ResultFileError, SweepError, DivergenceError, OSError) as err:
        print(f"kdsim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdsim: interrupted (finished sweep points are kept; rerun to resume)",
              file=sys.stderr)
        return 130
