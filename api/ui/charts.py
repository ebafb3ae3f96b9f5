"""The report as inline SVG charts, rendered on the server: no script, no network, and every
series tells itself apart by shape or text too, not by colour alone.

Every string from the report (layer and block names come from the user's model) is escaped here,
because the templates insert these charts unescaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

from core.options import Stage
from core.report import LayerRow, Report
from core.tasks.kinds import Metric

WIDTH = 640
LABEL_W = 170  # room for layer names left of the bars
VALUE_W = 110  # room for the numbers right of the bars (more where their text is longer)
CHAR_W = 7  # a 12 px system-ui character, generously: text right of a bar must not run off the chart
LOG_RATIO = 20  # a bar this many times the median one makes the scale logarithmic
ROW_H = 22
TOP = 30  # the legend
BEFORE, AFTER, KEPT, ACCENT, BAD = "#a5b4fc", "#3730a3", "#94a3b8", "#0f766e", "#b91c1c"


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    svg: str


def charts(report: Report) -> list[Chart]:
    return [
        Chart("channels", "Channels per layer, before and after", channels_chart(report.layers)),
        Chart("divergence", "Divergence per layer", divergence_chart(report.layers)),
        Chart("trajectory", f"{_sentence(report.accuracy_metric.label)} against MACs, step by step",
              trajectory_chart(report)),
        Chart("blocks", "Blocks tried by Stage 2", blocks_chart(report)),
    ]


def channels_chart(layers: list[LayerRow]) -> str:
    if not layers:
        return _message("The report lists no layers.")
    top = max(max(row.channels_before, row.channels_after) for row in layers) or 1
    scale = (WIDTH - LABEL_W - VALUE_W) / top
    parts = _legend([("before", BEFORE, "rect"), ("after", AFTER, "rect")])
    for i, row in enumerate(layers):
        y = TOP + i * ROW_H
        before, after = row.channels_before, row.channels_after
        parts.append(_label(row.name, y + ROW_H / 2))
        parts.append(_rect(LABEL_W, y + 2, before * scale, 8, BEFORE))
        parts.append(_rect(LABEL_W, y + 11, after * scale, 8, AFTER))
        text = f"{before} → removed" if after == 0 else f"{before} → {after}"
        parts.append(_text(LABEL_W + before * scale + 4, y + ROW_H / 2, text, fill=BAD if after == 0 else None))
    return _svg(TOP + len(layers) * ROW_H + 4, "Output channels of each layer before and after pruning", parts)


def divergence_chart(layers: list[LayerRow]) -> str:
    rows = [(row, row.divergence) for row in layers if row.divergence is not None]
    if not rows:
        return _message("The report has no per-layer divergence.")
    values = [f"{divergence:.3g}" for _, divergence in rows]
    span = WIDTH - LABEL_W - _value_width(values)
    bar, logarithmic = _bar_scale([divergence for _, divergence in rows], span)
    parts = _legend([("pruned", ACCENT, "rect"), ("kept at full width", KEPT, "rect")])
    if logarithmic:
        parts.append(_text(WIDTH - 4, 12, "log scale", anchor="end"))
    for i, ((row, divergence), value) in enumerate(zip(rows, values)):
        y = TOP + i * ROW_H
        pruned = row.channels_after < row.channels_before
        parts.append(_label(row.name, y + ROW_H / 2))
        parts.append(_rect(LABEL_W, y + 4, bar(divergence), ROW_H - 8, ACCENT if pruned else KEPT))
        parts.append(_text(LABEL_W + bar(divergence) + 4, y + ROW_H / 2, value))
    return _svg(TOP + len(rows) * ROW_H + 4, "Flow divergence of each layer of the original model"
                + (" (logarithmic scale)" if logarithmic else ""), parts)


def blocks_chart(report: Report) -> str:
    """Every block Stage 2 tried, in order, with its divergence and what became of it: removed, or
    kept because pruning width to the same size did better or because accuracy fell past the budget."""
    kinds = {block.name: block.kind for block in report.blocks}
    tried = [(step, step.block) for step in report.steps if step.stage == Stage.LAYERS and step.block]
    if not tried:
        return _message("Stage 2 tried no residual blocks.")
    notes = []
    for step, _ in tried:
        if step.accepted:
            outcome = "removed"
        elif step.declined:
            outcome = "kept: width did better"
        else:
            outcome = "kept: over the budget"
        notes.append(f"divergence {step.divergence or 0.0:.3g}, {outcome}")
    span = WIDTH - LABEL_W - _value_width(notes)
    bar, logarithmic = _bar_scale([step.divergence or 0.0 for step, _ in tried], span)
    parts = _legend([("removed", ACCENT, "rect"), ("kept", KEPT, "rect")])
    if logarithmic:
        parts.append(_text(WIDTH - 4, 12, "log scale", anchor="end"))
    for i, ((step, name), note) in enumerate(zip(tried, notes)):
        y = TOP + i * ROW_H
        length = bar(step.divergence or 0.0)
        parts.append(_label(f"{name} ({kinds.get(name, 'block')})", y + ROW_H / 2))
        parts.append(_rect(LABEL_W, y + 4, length, ROW_H - 8, ACCENT if step.accepted else KEPT))
        parts.append(_text(LABEL_W + length + 4, y + ROW_H / 2, note))
    return _svg(TOP + len(tried) * ROW_H + 4, "Blocks Stage 2 tried, in order, with their divergence and outcome",
                parts)


def trajectory_chart(report: Report) -> str:
    """The original model, each step (rolled-back ones apart from the path) and the final model
    after the last recovery, on the task's metric, with the worst value the budget allows as a dashed line."""
    steps = report.steps
    metric = report.accuracy_metric
    start = (report.macs_before, report.accuracy_before)
    final = (report.macs_after, report.accuracy_after)
    limit = metric.limit(start[1], report.target.budget)
    points = [start, final] + [(step.macs, step.accuracy) for step in steps]
    xs = [x for x, _ in points]
    ys = [y for _, y in points] + [limit]
    x_ticks, y_ticks = _ticks(0, max(xs)), _ticks(min(ys), max(ys))
    left, right, top, bottom, height = 60, WIDTH - 20, TOP + 10, 300 - 40, 300

    def px(x: float) -> float:
        return left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)

    entries = [("accepted step", AFTER, "circle"), ("rolled back", BAD, "ring"), ("final", ACCENT, "diamond")]
    parts = _legend(entries + [("budget", BAD, "dash")])
    for x in x_ticks:
        parts.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{bottom}" stroke="#e5e7eb"/>')
        parts.append(_text(px(x), bottom + 16, _si(x), anchor="middle"))
    for y in y_ticks:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{right}" y2="{py(y):.1f}" stroke="#e5e7eb"/>')
        parts.append(_text(left - 6, py(y), _tick(metric, y), anchor="end"))
    parts.append(_text((left + right) / 2, height - 6, "MACs", anchor="middle"))
    # the y axis is named above the plot, not along it: a metric's label can be longer than the axis
    parts.append(_text(10, top - 14, f"↑ {metric.label}"))
    parts.append(f'<line x1="{left}" y1="{py(limit):.1f}" x2="{right}" y2="{py(limit):.1f}" stroke="{BAD}" '
                 'stroke-dasharray="5 4"/>')
    path = [start] + [(step.macs, step.accuracy) for step in steps if step.accepted]
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in path)
    parts.append(f'<polyline points="{coords}" fill="none" stroke="{AFTER}" stroke-width="2"/>')
    parts.append(_marker("circle", px(start[0]), py(start[1]), AFTER,
                         f"original model: {_si(start[0])} MACs, {metric.label} {metric.show(start[1])}"))
    for step in steps:
        name = f"step {step.step} ({step.stage}): {_si(step.macs)} MACs, {metric.label} {metric.show(step.accuracy)}"
        if step.accepted:
            parts.append(_marker("circle", px(step.macs), py(step.accuracy), AFTER, name))
        else:
            parts.append(_marker("ring", px(step.macs), py(step.accuracy), BAD, name + ", rolled back"))
    parts.append(_marker("diamond", px(final[0]), py(final[1]), ACCENT,
                         f"final model after recovery: {_si(final[0])} MACs, {metric.label} {metric.show(final[1])}"))
    return _svg(height, f"{_sentence(metric.label)} against MACs over the pruning steps; the dashed line is the "
                        f"budget ({metric.describe_budget(report.target.budget)})", parts)


def _tick(metric: Metric, value: float) -> str:
    """A y-axis tick in the metric's terms: a percentage for fractions, a plain number for perplexity."""
    return f"{value * 100:.3g} %" if metric.is_fraction else f"{value:.3g}"


def _sentence(text: str) -> str:
    """`text` with its first letter capitalised and the rest as it is ("mAP@0.5" keeps its case)."""
    return text if text[:1].isupper() or text[1:2].isupper() else text[:1].upper() + text[1:]


def _value_width(texts: list[str]) -> float:
    """Room right of the bars for the longest of these texts."""
    return max(VALUE_W, CHAR_W * max(len(text) for text in texts) + 8)


def _bar_scale(values: list[float], span: float) -> tuple[Callable[[float], float], bool]:
    """Bar length by value, and whether it is logarithmic: it is when the largest value is over LOG_RATIO
    times the median positive one (a classifier's divergence flattened every other bar). On a log scale
    the smallest positive value still gets a tenth of a decade's room, so no scored bar vanishes."""
    top = max(values) or 1.0
    positive = sorted(value for value in values if value > 0)
    if len(positive) < 2 or top <= LOG_RATIO * positive[len(positive) // 2]:
        return (lambda value: span * value / top), False
    low, high = math.log10(positive[0]) - 0.1, math.log10(top)
    return (lambda value: span * (math.log10(value) - low) / (high - low) if value > 0 else 0.0), True


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _svg(height: float, description: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" role="img" '
            f'class="chart" font-size="12" font-family="system-ui, sans-serif">'
            f"<desc>{escape(description)}</desc>{''.join(parts)}</svg>")


def _message(text: str) -> str:
    return _svg(40, text, [_text(WIDTH / 2, 20, text, anchor="middle")])


def _legend(entries: list[tuple[str, str, str]]) -> list[str]:
    parts, x = [], LABEL_W
    for name, colour, shape in entries:
        parts.append(_marker(shape, x + 5, 12, colour, None))
        parts.append(_text(x + 14, 12, name))
        x += 24 + 7 * len(name)
    return parts


def _marker(shape: str, x: float, y: float, colour: str, name: str | None) -> str:
    title = f"<title>{escape(name)}</title>" if name else ""
    if shape == "rect":
        return f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{colour}">{title}</rect>'
    if shape == "dash":
        return (f'<line x1="{x - 8:.1f}" y1="{y:.1f}" x2="{x + 5:.1f}" y2="{y:.1f}" stroke="{colour}" '
                'stroke-dasharray="4 2"/>')
    if shape == "diamond":
        return (f'<path d="M{x:.1f} {y - 7:.1f}L{x + 7:.1f} {y:.1f}L{x:.1f} {y + 7:.1f}L{x - 7:.1f} {y:.1f}Z" '
                f'fill="{colour}">{title}</path>')
    fill = "white" if shape == "ring" else colour
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{colour}" stroke-width="2">{title}</circle>'


def _rect(x: float, y: float, width: float, height: float, colour: str) -> str:
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 0):.1f}" height="{height:.1f}" fill="{colour}"/>'


def _label(name: str, y: float) -> str:
    """A layer name, cut to fit the label column; the full name is its tooltip."""
    shown = name if len(name) <= 24 else "…" + name[-23:]
    return (f'<text x="{LABEL_W - 6}" y="{y:.1f}" text-anchor="end" dominant-baseline="middle">'
            f"<title>{escape(name)}</title>{escape(shown)}</text>")


def _text(x: float, y: float, text: str, anchor: str = "start", fill: str | None = None) -> str:
    extra = f' fill="{fill}"' if fill else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" dominant-baseline="middle"{extra}>'
            f"{escape(text)}</text>")
