"""charts.py on the typed report of a small digits run, read back from its report.json: well-formed SVG
with one mark per layer, step and block, names escaped, and a message where there is nothing to draw."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from api.ui.charts import (
    CHAR_W,
    WIDTH,
    _ticks,
    blocks_chart,
    channels_chart,
    charts,
    divergence_chart,
    trajectory_chart,
)
from core.intake.model_io import load_model
from core.intake.npz import load_npz
from core.options import CompressOptions, Stage, Target
from core.report import LayerRow, RemovedBlock, Report, StepRecord
from core.run.pipeline import compress
from core.tasks.kinds import Metric, Task
from tests.report_fixtures import sample_report, sample_steps

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def report(digits_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Report:
    model, data = digits_files
    out = tmp_path_factory.mktemp("report")
    # a target the tiny budget cannot reach keeps it pruning: several steps, some rolled back
    compress(load_model(model), load_npz(data), Target(macs_reduction=0.6, max_accuracy_drop=0.01),
             CompressOptions(recovery_iterations=1, final_recovery_iterations=1), out)
    return Report.model_validate_json((out / "report.json").read_text())


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img" and root.find(f"{SVG}desc") is not None
    return root


def texts(root: ET.Element) -> list[str]:
    """The visible text of each <text>, without its <title> tooltip."""
    return [(node.text or "") + "".join(child.tail or "" for child in node) for node in root.iter(f"{SVG}text")]


def test_every_chart_of_a_real_report_is_well_formed_svg(report: Report) -> None:
    rendered = charts(report)
    assert [chart.key for chart in rendered] == ["channels", "divergence", "trajectory", "blocks"]
    for chart in rendered:
        assert_text_fits(parse(chart.svg))


def test_channels_chart_has_two_bars_and_the_widths_per_layer(report: Report) -> None:
    root = parse(channels_chart(report.layers))
    legend = 2
    assert len(root.findall(f"{SVG}rect")) == legend + 2 * len(report.layers)
    labels = texts(root)
    for layer in report.layers:
        assert layer.name in labels
        after = "removed" if layer.channels_after == 0 else str(layer.channels_after)
        assert f"{layer.channels_before} → {after}" in labels


def assert_text_fits(root: ET.Element) -> None:
    """No text right of a bar runs past the chart's right edge (at CHAR_W per character)."""
    for node in root.iter(f"{SVG}text"):
        if node.get("text-anchor") == "start":
            text = (node.text or "") + "".join(child.tail or "" for child in node)
            assert float(node.get("x", 0)) + CHAR_W * len(text) <= WIDTH, text


def bar_widths(root: ET.Element) -> list[float]:
    """The bars' lengths, without the legend's squares."""
    return [float(rect.get("width", 0)) for rect in root.findall(f"{SVG}rect")[2:]]


def test_one_dwarfing_divergence_makes_the_scale_logarithmic() -> None:
    def layer(name: str, divergence: float) -> LayerRow:
        return LayerRow(name=name, channels_before=8, channels_after=8, divergence=divergence)

    even = parse(divergence_chart([layer("a", 1.0), layer("b", 2.0), layer("c", 4.0)]))
    assert "log scale" not in texts(even) and bar_widths(even) == pytest.approx([
        bar_widths(even)[2] / 4, bar_widths(even)[2] / 2, bar_widths(even)[2]])
    # a classifier whose divergence is 500 times the others' flattened them to a pixel on a linear scale
    dwarfed = parse(divergence_chart([layer("a", 0.01), layer("b", 0.02), layer("fc", 5.0)]))
    widths = bar_widths(dwarfed)
    assert "log scale" in texts(dwarfed) and "logarithmic" in "".join(dwarfed.find(f"{SVG}desc").itertext())
    assert widths[0] < widths[1] < widths[2] and widths[0] >= 8 and widths[1] > widths[2] / 10
    assert_text_fits(dwarfed)


def test_divergence_chart_has_a_bar_per_layer_with_a_divergence(report: Report) -> None:
    scored = [layer.divergence for layer in report.layers if layer.divergence is not None]
    assert scored
    root = parse(divergence_chart(report.layers))
    assert len(root.findall(f"{SVG}rect")) == 2 + len(scored)
    assert f"{scored[0]:.3g}" in texts(root)


def test_trajectory_marks_every_step_and_the_final_model(report: Report) -> None:
    steps = report.steps
    assert steps, "the run should have taken steps"
    root = parse(trajectory_chart(report))
    circles = root.findall(f"{SVG}circle")
    legend = 2
    # the original model, one mark per step, and the legend's circle and ring
    assert len(circles) == legend + 1 + len(steps)
    rolled_back = [c for c in circles[legend:] if c.get("fill") == "white"]
    assert len(rolled_back) == sum(not step.accepted for step in steps)
    titles = ["".join(node.itertext()) for node in root.iter(f"{SVG}title")]
    assert any(title.startswith("final model") for title in titles)
    assert root.find(f"{SVG}polyline") is not None
    # the budget line: accuracy_before minus max_accuracy_drop
    assert any(line.get("stroke-dasharray") for line in root.iter(f"{SVG}line"))


def budget_line_y(root: ET.Element) -> float:
    return next(float(line.get("y1", 0)) for line in root.iter(f"{SVG}line") if line.get("stroke-dasharray") == "5 4")


def y_ticks(root: ET.Element) -> dict[str, float]:
    """The y axis's tick labels (anchored at their end, left of the plot) and their heights."""
    return {(node.text or ""): float(node.get("y", 0)) for node in root.iter(f"{SVG}text")
            if node.get("text-anchor") == "end"}


def test_trajectory_is_drawn_in_the_task_s_metric_with_its_budget_line() -> None:
    """Top-1 reads in percent with the budget line below the original; perplexity in plain numbers with the
    line above it, at the original's value plus the relative budget."""
    top1 = parse(trajectory_chart(sample_report()))
    assert {"↑ top-1 accuracy", "budget"} <= set(texts(top1))
    assert all(tick.endswith(" %") for tick in y_ticks(top1)), y_ticks(top1)
    ticks = {float(tick.removesuffix(" %")) / 100: y for tick, y in y_ticks(top1).items()}
    assert budget_line_y(top1) > ticks[min(ticks, key=lambda value: abs(value - 0.99))]  # below the original
    steps = [StepRecord.model_validate(step.model_dump() | {"accuracy": value})
             for step, value in zip(sample_steps(), (12.4, 12.9, 14.0))]
    report = sample_report(task=Task.CAUSAL_LM, accuracy_metric=Metric.PERPLEXITY, accuracy_before=12.0,
                           accuracy_after=12.6, steps=steps,
                           target=Target(macs_reduction=0.5, max_accuracy_drop=0.1))
    root = parse(trajectory_chart(report))
    assert "↑ perplexity" in texts(root) and not any(tick.endswith("%") for tick in y_ticks(root)), y_ticks(root)
    titles = ["".join(node.itertext()) for node in root.iter(f"{SVG}title")]
    assert "final model after recovery: 2M MACs, perplexity 12.600" in titles, titles
    # 13.2, the most the budget allows, sits between the original (12.0) and the rolled-back step (14.0)
    ticks = {float(tick): y for tick, y in y_ticks(root).items()}
    (low, y_low), (high, y_high) = min(ticks.items()), max(ticks.items())
    expected = y_low + (13.2 - low) / (high - low) * (y_high - y_low)
    assert abs(budget_line_y(root) - expected) < 0.2, (budget_line_y(root), expected)
    assert "Perplexity against MACs, step by step" in [chart.title for chart in charts(report)]
    assert_text_fits(root)


def test_blocks_chart_shows_every_block_stage_two_tried_and_its_outcome(report: Report) -> None:
    tried = [step for step in report.steps if step.stage == Stage.LAYERS]
    assert tried, "the fixture's run reaches Stage 2"
    root = parse(blocks_chart(report))
    labels = texts(root)[2::2]  # after the two legend entries: one label and one value per block
    assert [label.split(" ")[0] for label in labels] == [step.block for step in tried]

    def step(stage: Stage, accepted: bool, **fields: object) -> StepRecord:
        return StepRecord.model_validate({"stage": stage, "step": 1, "macs": 1, "params": 1, "accuracy": 0.5,
                                          "seconds": 1.0, "accepted": accepted, **fields})

    synthetic = sample_report(blocks=[RemovedBlock(name="layer2.0", kind="projection", divergence=0.5)], steps=[
        step(Stage.LAYERS, True, block="layer2.0", divergence=0.5),
        step(Stage.LAYERS, False, block="layer1.1", divergence=0.25, declined="width"),
        step(Stage.FILTERS, True),
        step(Stage.LAYERS, False, block="layer1.0")])
    root = parse(blocks_chart(synthetic))
    assert texts(root)[2:] == ["layer2.0 (projection)", "divergence 0.5, removed", "layer1.1 (block)",
                               "divergence 0.25, kept: width did better", "layer1.0 (block)",
                               "divergence 0, kept: over the budget"]
    assert_text_fits(root)
    assert "Stage 2 tried no residual blocks." in texts(parse(blocks_chart(sample_report(steps=[]))))


def test_names_from_the_model_are_escaped(report: Report) -> None:
    hostile = [report.layers[0].model_copy(update={"name": '<script>alert("x")</script>&'})]
    svg = channels_chart(hostile)
    assert "<script>" not in svg
    root = parse(svg)
    assert any(title.text and title.text.startswith("<script>") for title in root.iter(f"{SVG}title"))


def test_empty_reports_draw_a_message() -> None:
    assert "no layers" in channels_chart([])
    assert "no per-layer divergence" in divergence_chart(
        [LayerRow(name="fc", channels_before=10, channels_after=10, divergence=None)])
    one_point = sample_report(macs_before=100, macs_after=100, accuracy_before=0.5, accuracy_after=0.5, steps=[])
    parse(trajectory_chart(one_point))


@pytest.mark.parametrize(("lo", "hi"), [(0, 4_509_322), (0.81, 1.0), (0.5, 0.5), (0, 7)])
def test_ticks_cover_the_range_with_round_steps(lo: float, hi: float) -> None:
    ticks = _ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 8
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
