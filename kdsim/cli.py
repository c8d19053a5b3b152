"""The ``kdsim`` command line. Errors print one line and exit non-zero, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EXAMPLES = textwrap.dedent("""\
    examples:
      kdsim run                                  # the default linear Gaussian simulation
      kdsim run configs/linear_rank.toml --out runs/rank
      kdsim plot runs/rank                       # figures written inside the folder
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
    plot = sub.add_parser("plot", help="draw the figures of a run folder")
    plot.add_argument("folder")
    return p


def _print_summary(res) -> None:
    import pandas as pd
    with pd.option_context("display.width", 120, "display.max_columns", 10,
                           "display.float_format", lambda x: f"{x:.4g}"):
        print(res.table())
    if res.notes:
        print("\nnotes:")
        for note in res.notes:
            print(f"  - {note}")


def _cmd_run(args) -> int:
    from . import simulate
    from .config import SimConfig, load_config
    cfg = load_config(args.config) if args.config else SimConfig()
    res = simulate(cfg)
    res.save(args.out)
    _print_summary(res)
    meta = res.meta
    print(f"\n{meta['particle_steps']:.3g} particle-steps in {meta['engine_seconds']:.1f} s "
          f"(total {meta['total_seconds']:.1f} s); result saved in {args.out}/")
    if not args.no_plot:
        png = os.path.join(args.out, "overview.png")
        res.plot(png)
        print(f"plot written to {png}")
    return 0


def _cmd_plot(args) -> int:
    from .io import load_result
    res = load_result(args.folder)
    png = os.path.join(args.folder, "overview.png")
    res.plot(png)
    print(f"plot written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .io import ResultFileError
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return {"run": _cmd_run, "plot": _cmd_plot}[args.command](args)
    except (ConfigError, ResultFileError, OSError) as err:
        print(f"kdsim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdsim: interrupted", file=sys.stderr)
        return 130
