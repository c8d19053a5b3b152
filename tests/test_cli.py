"""The command line: runs, writes its files, and fails with one clear line."""

import subprocess
import sys

from kdsim.cli import main


def test_run_and_plot(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("num_datasets = 2\nnum_particles = 16\n[task]\nd = 3\nn = 12\n[teacher]\nnum_steps = 10\n")
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gen_S" in printed and "mean" in printed
    assert (out / "result.json").exists() and (out / "overview.png").exists()
    (out / "overview.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "overview.png").exists()


def test_errors_are_one_line_without_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[task]\nd = -3\n")
    proc = subprocess.run([sys.executable, "-m", "kdsim", "run", str(cfg), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdsim: error: task.d must be an integer >= 1 and <= 65536, got -3"
    assert "Traceback" not in proc.stderr
