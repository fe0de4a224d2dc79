"""Results out: ``bench/results/<figure>.json``, the table in docs/benchmarks.md, docs/latency.png.

The table is rebuilt from every JSON file in the results folder, so that a
run of one figure (``python -m bench m1``) refreshes its rows and keeps the
others; rows measured in an earlier run than the latest say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.figures import FIGURES

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"


def write_figure(out_dir: Path, data: dict[str, Any]) -> Path:
    """Write one figure's JSON (result and run metadata) as ``<figure>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data['figure']}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return path


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every figure's JSON in the results folder, in the order of a full run."""
    found: list[dict[str, Any]] = []
    for key in FIGURES:
        path = out_dir / f"{key}.json"
        if path.exists():
            found.append(orjson.loads(path.read_bytes()))
    return found


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip() if unit and unit != "ratio" else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _machine_line(run: dict[str, Any]) -> str:
    m = run.get("machine", {})
    source = run.get("source", {})
    took = run.get("duration_s")
    parts = [
        f"**{m.get('cpu', '?')}**, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB",
        f"Python {m.get('python', '?')}",
        f"{m.get('system', '')} {m.get('kernel', '?')}".strip(),
        m.get("date", "?"),
    ]
    line = "Machine: " + ", ".join(parts) + "."
    if source:
        dirty = " with uncommitted changes" if source.get("dirty") else ""
        line += (
            f" Tidings under test: `{source.get('commit', '?')}`{dirty},"
            f" from `{source.get('path', '?')}`."
        )
    if took is not None:
        line += f" The run took {took / 60:.1f} min"
        if run.get("figures"):
            line += f" ({', '.join(run['figures'])})"
        line += "."
    if run.get("quick"):
        line += " **Quick plan**: small counts for developing the harness, not the figures."
    if run.get("pinned") is False:
        line += " **Not pinned**: taskset or a second core was missing."
    return line


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cpu(cpu: dict[str, Any]) -> str:
    """``generator / server`` shares of a core, and the echo baseline's beside them."""
    if not cpu:
        return "—"
    text = f"{_share(cpu.get('generator'))} / {_share(cpu.get('server'))}"
    if "echo_server" in cpu:
        text += f" (echo: {_share(cpu.get('echo_generator'))} / {_share(cpu['echo_server'])})"
    return text


def render_table(results: list[dict[str, Any]]) -> str:
    """The generated Markdown: machine, the figures' table, and the sweep's steps."""
    if not results:
        return "No results yet: run `make bench`."
    latest = max(results, key=lambda r: r.get("run", {}).get("finished", ""))
    latest_run = latest.get("run", {})
    lines = [_machine_line(latest_run), ""]
    lines += [
        "| figure | measured | baseline (same run) | ratio | target | result "
        "| CPU: load generator / server | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        run_id = result.get("run", {}).get("id")
        older = f" (run {run_id})" if run_id != latest_run.get("id") else ""
        for row in result["rows"]:
            target = row.get("target_text") or "—"
            baseline = _fmt(row["baseline"], row["unit"])
            if row["baseline"] is not None and row["baseline_name"] not in ("—", ""):
                baseline += f" ({row['baseline_name']})"
            elif row["baseline"] is None:
                baseline = "—"
            lines.append(
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (
                        row["name"] + older,
                        _fmt(row["measured"], row["unit"]),
                        baseline,
                        _fmt(row["ratio"]) if row["ratio"] is not None else "—",
                        target,
                        row["verdict"],
                        _cpu(row.get("cpu") or {}),
                        row["note"],
                    )
                )
                + " |"
            )
        if result.get("error"):
            first = str(result["error"]).splitlines()[0]
            lines.append(
                f"| {_cell(result['title'])}: error{older} | | | | | error | | {_cell(first)} |"
            )
    sweep = next((r for r in results if r["figure"] == "sweep"), None)
    if sweep is not None and sweep.get("series"):
        lines += [
            "",
            "Latency against offered load (the plot's points):",
            "",
            "| store | offered msgs/s | delivered msgs/s | delivered / sent | p50 ms | p99 ms | |",
            "|---|---|---|---|---|---|---|",
        ]
        for store, steps in sweep["series"].items():
            for s in steps:
                lines.append(
                    f"| {store} | {_fmt(s['offered_per_s'])} | {_fmt(s['rate_per_s'])} | "
                    f"{s['counted']} / {s['expected']} | {_fmt(s['p50_ms'])} | "
                    f"{_fmt(s['p99_ms'])} | {'saturated' if s['saturated'] else ''} |"
                )
    return "\n".join(lines)


def write_docs(docs: Path, results: list[dict[str, Any]]) -> None:
    """Replace the generated block of ``docs`` (between the markers) with the table."""
    block = f"{START}\n{render_table(results)}\n{END}"
    text = docs.read_text() if docs.exists() else ""
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Results\n\n" + block + "\n"
    docs.write_text(text)


def write_plot(png: Path, results: list[dict[str, Any]]) -> bool:
    """Plot p50/p99 against offered load for each store; False when there is no sweep."""
    sweep = next((r for r in results if r["figure"] == "sweep"), None)
    if sweep is None or not any(sweep.get("series", {}).values()):
        return False
    # matplotlib is the bench extra; without it (type-checking in the dev set)
    # these names are Any.
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = {"embedded": "tab:blue", "nx-27017": "tab:orange"}
    for store, steps in sweep["series"].items():
        points = [s for s in steps if s.get("p50_ms") is not None]
        if not points:
            continue
        colour = colours.get(store, "tab:gray")
        x = [s["offered_per_s"] for s in points]
        for key, style, marker in (("p50_ms", "-", "o"), ("p99_ms", "--", "s")):
            ax.plot(
                x,
                [s[key] for s in points],
                style,
                color=colour,
                marker=marker,
                label=f"{store} {key[:3]}",
            )
        for s in points:
            if s["saturated"]:
                ax.annotate(
                    "saturated",
                    (s["offered_per_s"], s["p99_ms"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=colour,
                )
    machine = sweep.get("run", {}).get("machine", {})
    ax.set_xscale("log")
    ax.set_yscale("log")
    offered = sorted({s["offered_per_s"] for steps in sweep["series"].values() for s in steps})
    ax.set_xticks(offered)
    ax.set_xticklabels([f"{v:g}" for v in offered])
    ax.minorticks_off()
    pairs = sweep.get("params", {}).get("pairs", "?")
    ax.set_xlabel(f"offered load, messages/s ({pairs} pairs, open loop)")
    ax.set_ylabel("send → recipient latency, ms")
    ax.set_title(
        "Tidings delivery latency against offered load\n"
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('date', '?')}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return True
