"""The documentation stands alone and stays current: README links resolve inside the
repository, docs/config.md is what the fields generate, `kdsim config` shows every
field, and the quickstart notebook runs."""

import os
import re
from pathlib import Path

import pytest

from kdsim import config as config_mod
from kdsim.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", "docs/theory.md", "docs/config.md"])
def test_every_link_resolves_inside_the_repository(doc):
    text = (ROOT / doc).read_text()
    assert "../shared" not in text and "SPEC.md" not in text and "API.md" not in text
    for target in LINK.findall(text):
        assert not re.match(r"[a-z]+://", target), f"{doc} links outside the repository: {target}"
        path, _, anchor = target.partition("#")
        resolved = ((ROOT / doc).parent / path).resolve() if path else (ROOT / doc)
        assert resolved.is_relative_to(ROOT), f"{doc}: {target} leaves the repository"
        assert resolved.exists(), f"{doc}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            headings = [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)]
            assert anchor in headings, f"{doc}: no heading for #{anchor}"


def test_config_reference_covers_every_field_and_docs_config_md_is_current():
    rows = config_mod.reference()
    assert [r.path for r in rows] == config_mod.field_paths()
    for row in rows:
        assert row.meaning, f"{row.path} has no doc="
        assert row.allowed, f"{row.path} has no allowed range"
    by_path = {r.path: r for r in rows}
    assert by_path["teacher.step_size"].default == "null" and by_path["teacher.step_size"].traced
    assert by_path["task.d"].default == "8" and not by_path["task.d"].traced
    assert by_path["student.model.width"].default == "8"          # the student's own default
    assert by_path["task.d"].allowed == "an integer >= 1 and <= 65536"
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == config_mod.reference_markdown(), \
        "docs/config.md is stale: regenerate it with `kdsim config --markdown > docs/config.md`"


def test_kdsim_config_prints_every_field_with_its_doc(capsys):
    assert cli_main(["config"]) == 0
    out = capsys.readouterr().out
    for row in config_mod.reference():
        assert f"{row.path} = {row.default}" in out
        assert row.meaning.split()[0] in out
    assert cli_main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == config_mod.reference_markdown()


def test_quickstart_notebook_runs_and_is_saved_with_its_outputs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "examples" / "quickstart.ipynb"
    saved = nbformat.read(path, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code[1:]), "save the notebook with its outputs"
    kinds = {k for c in code for o in c.outputs for k in o.get("data", {})}
    assert {"text/html", "image/png"} <= kinds        # the HTML summary and the figures
    assert any(c.cell_type == "markdown" and "Bring your own model" in c.source for c in saved.cells)
    # the kernel imports this checkout's kdsim
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("CI", "1")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(o.output_type == "error" for o in cell.outputs)
