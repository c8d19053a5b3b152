"""The command line: runs, prints the saved numbers, and fails with one clear line."""

import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest

import kdsim
from kdsim.cli import main


def test_run_prints_the_saved_numbers_and_plot(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("num_datasets = 2\nnum_particles = 16\n[task]\nd = 3\nn = 12\n[teacher]\nnum_steps = 10\n")
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = kdsim.load_result(out)
    assert saved.config == kdsim.SimConfig.from_dict({"num_datasets": 2, "num_particles": 16,
                                                      "task": {"d": 3, "n": 12},
                                                      "teacher": {"num_steps": 10}})
    # every row of the printed table is the saved summary to its 4 printed digits
    number = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)"
    rows = 0
    for line in printed.splitlines():
        parts = line.split()
        if parts and parts[0] in saved.summary.index and len(parts) == 6 \
                and all(re.fullmatch(number, p) for p in parts[1:]):
            want = saved.summary.loc[parts[0], ["mean", "se", "ci_low", "ci_high", "n_datasets"]]
            np.testing.assert_allclose([float(p) for p in parts[1:]], want.to_numpy(float),
                                       rtol=5e-4, err_msg=parts[0])
            rows += 1
    assert rows >= 5 and "gen_S " in printed
    steps = float(re.search(r"([\d.e+]+) particle-steps", printed).group(1))
    assert steps == 2 * 16 * (10 + 10)        # the student runs the teacher's steps by default
    assert (out / "overview.png").stat().st_size > 10_000
    (out / "overview.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "overview.png").exists()


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[task]\nd = -3\n")
    typo = tmp_path / "typo.toml"
    typo.write_text("[task]\nnn = 3\n")
    # one real process: exit status 2 and one line on stderr, no traceback
    proc = subprocess.run([sys.executable, "-m", "kdsim", "run", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "CI": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "kdsim: error: task.d must be an integer >= 1 and <= 65536, got -3"
    # the same contract in-process for the other kinds of error
    cases = [
        (["run", str(typo), "--out", str(tmp_path / "o")],
         "kdsim: error: unknown key 'task.nn' (did you mean 'task.n'?)"),
        (["plot", str(tmp_path / "nothing")], "kdsim: error: "),
        (["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "s")], "kdsim: error: "),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        if message.endswith(": "):
            assert lines[0].startswith(message) and len(lines[0]) > len(message), lines[0]
        else:
            assert lines[0] == message
    assert not (tmp_path / "o").exists()                  # nothing written on a bad config


def test_bench_runs_the_throughput_script_with_its_options(monkeypatch, capsys):
    """`kdsim bench` hands its options to benchmarks/throughput.py (default --quick).
    The real script is run with a bad option, so its own parser answers (cheaply)."""
    seen = []
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: seen.append((path, list(sys.argv))))
    assert main(["bench"]) == 0
    assert main(["bench", "--sizes", "64", "--no-mlp"]) == 0
    script = os.path.join(os.path.dirname(os.path.dirname(kdsim.__file__)), "benchmarks", "throughput.py")
    assert seen == [(script, [script, "--quick"]), (script, [script, "--sizes", "64", "--no-mlp"])]
    monkeypatch.undo()
    saved = os.environ.get("XLA_FLAGS")      # the script sets it on import; keep it local
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--sizes", "x"])
    finally:
        os.environ.pop("XLA_FLAGS", None)
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved
    assert exit_.value.code == 2
    assert "argument --sizes: invalid int value: 'x'" in capsys.readouterr().err
    # other commands still refuse options they do not know
    with pytest.raises(SystemExit):
        main(["plot", "somewhere", "--sizes", "64"])
