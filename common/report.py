"""Tables and figures of an experiment, built from its child runs in MLflow alone.

``lightyard reproduce`` / ``bench`` call :func:`build_report` when their grid is done, and
``lightyard report <parent run id>`` calls it again later, from the store, without rerunning. What to
build is the experiment's ``report`` section in config (saved with the parent run)::

    report:
      tables:
        - name: table2                 # tables/table2.md on the parent run
          title: Test accuracy %, mean ± std over the splits
          rows: model.name             # one axis or a list of axes: a row per value (grid order)
          columns: data.name           # optional: one column per value of this axis (then one metric) ...
          metric: test_acc
          metrics: [test_acc, seconds] # ... or, without columns, one column per metric ({metric, label, scale, digits, std})
          scale: 100                   # shown value = metric × scale
          digits: 2
          std: false                   # means only (per table, or per metric: a size that no seed changes)
          best: max                    # bold the best mean per column (max | min)
          select: {axis: optim.lr, by: val_acc, mode: max}   # per cell, keep the children of the axis value
                                       # with the best mean of `by` (model selection on validation)
          where: {data.name: texas}    # only these children
          headers: {model.name: method}   # column headers of the row axes (default: the key's last part)
          labels: {hog_gcn: HOG-GCN}   # display names of axis values
          paper: {HOG-GCN: {texas: "85.17 ± 4.40"}}   # a "paper" row under each row that has numbers
          count: true                  # an "n" column: children per cell
      figures:
        - {name: acc_vs_h, x: data.homophily, y: test_acc, series: model.name, scale: 100, xlabel: ..., ylabel: ...}
      extra: package.module:function   # function(children, cfg, tracker) -> Markdown, for what a table spec cannot say

Every cell aggregates the children that share its row (and column) values: mean ± sample std over the
remaining axes (seeds, splits), so a table of 3 seeds shows the spread without any code.
``lightyard report <id> <id> ...`` (reruns of one experiment, :func:`build_range_report`) shows instead the min–max
over the runs of each run's own cell value.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from common.config import ConfigError
from common.tables import format_cell, markdown_table
from common.tracking import Tracker, pyplot

POINT_TAG = "lightyard.point"  # JSON {dotted key: value} of the child's grid point
INDEX_TAG = "lightyard.point_index"
SUPERSEDED_TAG = "lightyard.superseded"


def point_key(point: Mapping[str, Any]) -> str:
    return json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True, default=str)


def children_rows(client: Any, parent_id: str, experiment_id: str) -> list[dict]:
    """One dict per FINISHED, current child: its point's values, its metrics, ``_run_id``, ``_index``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    rows = []
    for run in runs:
        tags = run.data.tags
        if run.info.status != "FINISHED" or tags.get(SUPERSEDED_TAG) or POINT_TAG not in tags:
            continue
        rows.append({**run.data.metrics, **json.loads(tags[POINT_TAG]), "_run_id": run.info.run_id, "_index": int(tags.get(INDEX_TAG, 0))})
    return sorted(rows, key=lambda r: r["_index"])


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def _label(value: Any, labels: Mapping) -> str:
    text = format_cell(value) if isinstance(value, float) else str(value)
    return str(labels.get(text, labels.get(str(value), text)))


def _select(children: list[dict], select: Mapping | None) -> list[dict]:
    """Keep the children of the ``select.axis`` value whose mean ``select.by`` is best."""
    if not select:
        return children
    groups: dict[str, list[dict]] = {}
    for child in children:
        groups.setdefault(str(child.get(select["axis"])), []).append(child)
    scored = {k: [c[select["by"]] for c in g if select["by"] in c] for k, g in groups.items()}
    scored = {k: statistics.mean(v) for k, v in scored.items() if v}
    if not scored:
        return []
    pick = (min if select.get("mode", "max") == "min" else max)(scored, key=scored.get)
    return groups[pick]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _nans(group: list[dict], metric: str) -> int:
    """Children of a cell whose value is NaN (a diverged seed, a value its point could not compute): the mean is over
    the others, and the cell says so."""
    return sum(1 for c in group if isinstance(c.get(metric), float) and math.isnan(c[metric]))


def _range_cell(group: list[dict], metric: Mapping, parents: int) -> str:
    """min–max over the parents of the value each parent's own report shows in this cell (its mean over the other
    axes); "(k of n runs)" where only k parents have one (a failed child, a NaN); "(m NaN)" where m children's values
    are NaN."""
    means = []
    for parent in dict.fromkeys(c["_parent"] for c in group):
        mean, _, n = mean_std([c[metric["metric"]] * metric["scale"] for c in group if c["_parent"] == parent and metric["metric"] in c])
        if n:
            means.append(mean)
    notes = [f"{len(means)} of {parents} runs"] if len(means) < parents else []
    nans = _nans(group, metric["metric"])
    if not means:
        return "–" + (f" ({nans} NaN)" if nans else "")
    digits = metric["digits"]
    low, high = (f"{v:.{digits}f}" if digits is not None else format_cell(float(v)) for v in (min(means), max(means)))
    text = low if low == high else f"{low} to {high}" if min(means) < 0 else f"{low}–{high}"
    return text + (f" ({'; '.join(notes + ([f'{nans} NaN'] if nans else []))})" if notes or nans else "")


def _cell(mean: float, std: float, n: int, digits: int | None, show_std: bool, nans: int = 0) -> str:
    if n == 0:
        return "–" + (f" ({nans} NaN)" if nans else "")
    text = f"{mean:.{digits}f}" if digits is not None else format_cell(float(mean))
    if show_std and n > 1:
        text += f" ± {std:.{digits}f}" if digits is not None else f" ± {format_cell(float(std))}"
    return text + (f" ({nans} NaN)" if nans else "")


def _metric_specs(spec: Mapping) -> list[dict]:
    out = []
    for item in _as_list(spec.get("metrics")) or _as_list(spec.get("metric")):
        item = dict(item) if isinstance(item, Mapping) else {"metric": item}
        item.setdefault("label", item["metric"])
        item.setdefault("scale", spec.get("scale", 1))
        item.setdefault("digits", spec.get("digits"))
        item.setdefault("std", spec.get("std", True))
        out.append(item)
    if not out:
        raise ConfigError(f"report table '{spec.get('name')}' names no metric (metric: or metrics:)")
    return out


def _matches(child: Mapping, where: Mapping) -> bool:
    return all(str(child.get(k)) in {str(v) for v in _as_list(value)} for k, value in where.items())


def build_table(children: list[dict], spec: Mapping, parents: int = 0) -> list[dict]:
    """The rows of one table spec (see the module docstring) from the children's points and metrics. ``parents``
    (:func:`build_range_report`: children of that many reruns, each tagged ``_parent``): each cell the min–max over
    the reruns of their own cell values instead of mean ± std."""
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    row_axes = _as_list(spec.get("rows"))
    col_axis = spec.get("columns")
    labels = spec.get("labels") or {}
    metrics = _metric_specs(spec)
    if col_axis and len(metrics) != 1:
        raise ConfigError(f"report table '{spec.get('name')}': with columns: give one metric")
    children = [c for c in children if _matches(c, spec.get("where") or {})]

    def key_of(child: dict, axes: list[str]) -> tuple:
        return tuple(str(child.get(a)) for a in axes)

    row_keys: dict[tuple, dict] = {}
    for child in children:
        row_keys.setdefault(key_of(child, row_axes), child)
    col_values = list(dict.fromkeys(str(c.get(col_axis)) for c in children)) if col_axis else []
    col_display = {v: _label(next(c.get(col_axis) for c in children if str(c.get(col_axis)) == v), labels) for v in col_values}

    rows: list[dict] = []
    row_labels: list[str] = []
    means: list[dict[str, float]] = []
    for key, first in row_keys.items():
        members = [c for c in children if key_of(c, row_axes) == key]
        headers = spec.get("headers") or {}
        row = {headers.get(a, a.split(".")[-1]): _label(first.get(a), labels) for a in row_axes}
        row_labels.append(" / ".join(_label(first.get(a), labels) for a in row_axes))
        mean_row: dict[str, float] = {}
        cells = (
            [(col_display[v], [c for c in members if str(c.get(col_axis)) == v], metrics[0]) for v in col_values]
            if col_axis
            else [(m["label"], members, m) for m in metrics]
        )
        counts = []
        for header, group, m in cells:
            group = _select(group, spec.get("select"))
            mean, std, n = mean_std([c[m["metric"]] * m["scale"] for c in group if m["metric"] in c])
            row[header] = (
                _range_cell(group, m, parents) if parents else _cell(mean, std, n, m["digits"], m["std"], _nans(group, m["metric"]))
            )
            mean_row[header] = mean
            counts.append(n)
        if spec.get("select") and not col_axis:
            chosen = _select(members, spec["select"])
            row[f"chosen {spec['select']['axis'].split('.')[-1]}"] = (
                _label(chosen[0].get(spec["select"]["axis"]), labels) if chosen else "–"
            )
        if spec.get("count"):
            row["n"] = max(counts) if counts else 0
        rows.append(row)
        means.append(mean_row)
    best = spec.get("best")
    if best and rows:
        for header in means[0]:
            values = [m.get(header, math.nan) for m in means]
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                target = max(finite) if best == "max" else min(finite)
                for row, value in zip(rows, values):
                    if value == target:
                        row[header] = f"**{row[header]}**"
    paper = spec.get("paper") or {}
    if paper:
        out = []
        for row, label in zip(rows, row_labels):
            out.append(row)
            if label in paper:
                first_header = next(iter(row))
                out.append(
                    {first_header: f"paper {label}", **{h: paper[label].get(h) for h in row if h != first_header and h in paper[label]}}
                )
        rows = out
    return rows


def build_figure(children: list[dict], spec: Mapping):
    """Mean ± std of ``y`` against ``x``, one line per ``series`` value (optionally one panel per ``panels`` value)."""
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    plt = pyplot()
    labels = spec.get("labels") or {}
    scale = spec.get("scale", 1)
    panel_axis = spec.get("panels")
    panels = list(dict.fromkeys(str(c.get(panel_axis)) for c in children)) if panel_axis else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        members = [c for c in children if panel is None or str(c.get(panel_axis)) == panel]
        series = list(dict.fromkeys(str(c.get(spec.get("series"))) for c in members)) if spec.get("series") else [None]
        for s in series:
            group = [c for c in members if s is None or str(c.get(spec["series"])) == s]
            xs = sorted({c[spec["x"]] for c in group if spec["x"] in c}, key=lambda v: float(v))
            stats = [mean_std([c[spec["y"]] * scale for c in group if c.get(spec["x"]) == x and spec["y"] in c]) for x in xs]
            ax.errorbar(
                [float(x) for x in xs],
                [m for m, _, _ in stats],
                yerr=[sd for _, sd, _ in stats],
                marker="o",
                capsize=3,
                label=_label(s, labels) if s is not None else None,
            )
        ax.set(
            xlabel=spec.get("xlabel", spec["x"]),
            ylabel=spec.get("ylabel", spec["y"]),
            title=(f"{spec.get('title', '')} {_label(panel, labels)}" if panel else spec.get("title", "")).strip(),
        )
        if spec.get("logx"):
            ax.set_xscale("log")
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if spec.get("series"):
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def build_report(tracker: Tracker, cfg: DictConfig, experiment: str, status_line: str = "") -> str:
    """Every table and figure of ``experiment`` from the parent run's children; logged to the parent, returned as Markdown."""
    from common.runner import load_target

    parent = tracker.client.get_run(tracker.run_id)
    children = children_rows(tracker.client, tracker.run_id, parent.info.experiment_id)
    spec = cfg.experiments[experiment].get("report") or {}
    parts = [f"# {cfg.pipeline} — {experiment} (parent run {tracker.run_id})", status_line or f"{len(children)} finished child runs."]
    for table in spec.get("tables") or []:
        rows = build_table(children, table)
        text = markdown_table(rows, title=table.get("title"))
        tracker.log_text(text, f"tables/{table.get('name', 'table')}.md")
        parts.append(text)
    for figure in spec.get("figures") or []:
        if children:
            import matplotlib.pyplot as plt

            fig = build_figure(children, figure)
            tracker.log_figure(fig, f"figures/{figure.get('name', 'figure')}.png")
            plt.close(fig)
            parts.append(f"Figure: figures/{figure.get('name', 'figure')}.png on the parent run.")
    if spec.get("extra") and children:
        parts.append(load_target(spec["extra"])(children, cfg, tracker))
    text = "\n\n".join(p for p in parts if p)
    tracker.log_text(text, "report.md")
    return text


def build_range_report(client: Any, cfg: DictConfig, experiment: str, parents: Sequence[Any]) -> str:
    """The tables of several parent runs of one experiment (the same settings: a benchmark rerun): each cell the
    min–max over the parents of the value each one's own report shows there. Printed, not logged (no one parent owns
    it); figures and an ``extra`` section are per parent: ``lightyard report <id>`` builds them."""
    children, lines = [], []
    for run in parents:
        rows = children_rows(client, run.info.run_id, run.info.experiment_id)
        children += [{**row, "_parent": run.info.run_id} for row in rows]
        lines.append(f"- {run.info.run_id}: {run.info.status}, {len(rows)} finished child runs")
    children.sort(key=lambda r: r["_index"])
    n = len(parents)
    parts = [f"# {cfg.pipeline} — {experiment}, min–max over {n} runs", "\n".join(lines)]
    for table in (cfg.experiments[experiment].get("report") or {}).get("tables") or []:
        title = f"{table.get('title') or table.get('name', 'table')} [here: min–max over {n} runs of each run's cell]"
        parts.append(markdown_table(build_table(children, table, parents=n), title=title))
    return "\n\n".join(parts)
