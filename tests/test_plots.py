"""Figures (kdsim/plots.py): a result's plot is written with its panels."""


def test_plot_writes_png(small_result, tmp_path):
    path = tmp_path / "p.png"
    fig = small_result.plot(path)
    assert path.stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes]
    assert any("gaps" in t for t in titles)
