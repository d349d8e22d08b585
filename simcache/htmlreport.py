"""`simcache report RESULTS --out DIR`: one self-contained HTML page (figures inline) and the
PNGs, from a sweep's results (docs/design.md §13).

A *setting* is everything but the policy and the capacity: trace, workload (batch, prefill,
split) and scope. Each setting gets a panel in each figure:

* hit ratio against capacity per policy, Belady-with-bypass drawn as the ceiling;
* predicted ms/token against the GPU memory the resident experts take
  (capacity x expert_bytes x layers per layer, capacity x expert_bytes global);
* the gap decomposition at each capacity: LRU's hit ratio, what knowing the future adds to
  eviction (Belady), and what bypass adds on top (Belady-with-bypass);
* a table of the winner per memory budget (:func:`simcache.sweeps.winner`).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from simcache._files import atomic_output, atomic_write_text
from simcache.errors import SimcacheError

SETTING = ("trace", "trace_hash", "batch", "prefill", "split", "scope")
CEILING = "belady-bypass"
GiB = 2**30


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row) -> str:
    """Policy, with the knobs that tell two cells of one policy apart."""
    text = row["policy"]
    if row.get("threshold") is not None and row["threshold"] == row["threshold"]:
        text += f" tau={row['threshold']:.3g}"
    return text


def settings(frame):
    """(title, sub-frame) per setting, in first-seen order."""
    keys = [k for k in SETTING if k in frame.columns]
    out = []
    for key, sub in frame.groupby([frame[k].map(repr) for k in keys], sort=False, dropna=False):
        r = sub.iloc[0]
        name = Path(str(r["trace"])).name
        parts = [name, f"batch {r['batch']}", f"prefill {r['prefill']}", f"scope {r['scope']}"]
        if "split" in sub and r["split"] is not None and r["split"] == r["split"]:
            parts.append(f"split {r['split']}")
        out.append((", ".join(parts), sub))
    return out


def _grid(plt, n):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _lines(sub, x, y):
    """Per policy label: sorted (x, y) arrays."""
    out = {}
    labels = sub.apply(_label, axis=1)
    for lab in dict.fromkeys(labels):
        part = sub[labels == lab].sort_values(x)
        out[lab] = (part[x].to_numpy(float), part[y].to_numpy(float))
    return out


def fig_hit_ratio(plt, panels):
    fig, axes = _grid(plt, len(panels))
    for ax, (title, sub) in zip(axes, panels):
        for lab, (xs, ys) in _lines(sub, "capacity", "hit_ratio").items():
            ceiling = lab == CEILING
            ax.plot(xs, ys, "k--" if ceiling else "o-", ms=3, lw=2 if ceiling else 1.2,
                    label=f"{lab} (ceiling)" if ceiling else lab)
        ax.set(title=title, xlabel="capacity (slots)", ylabel="hit ratio", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Hit ratio against capacity (Belady-with-bypass: the ceiling of any policy)")
    return fig


def fig_time_memory(plt, panels):
    fig, axes = _grid(plt, len(panels))
    for ax, (title, sub) in zip(axes, panels):
        sub = sub[sub["memory_bytes"].notna() & sub["time_per_token_s"].notna()]
        if sub.empty:
            ax.text(0.5, 0.5, "no timing (no expert_bytes)", ha="center", transform=ax.transAxes)
        for lab, (xs, ys) in _lines(sub.assign(memory_gib=sub["memory_bytes"] / GiB,
                                               ms=sub["time_per_token_s"] * 1e3), "memory_gib", "ms").items():
            ax.plot(xs, ys, "k--" if lab == CEILING else "o-", ms=3, label=lab)
        ax.set(title=title, xlabel="GPU memory of resident experts (GiB)", ylabel="predicted ms/token")
        ax.grid(alpha=0.3)
        if not sub.empty:
            ax.legend(fontsize=7)
    fig.suptitle("Predicted time per token against the GPU memory the experts take")
    return fig


def gap_table(sub):
    """Per capacity: LRU, Belady and Belady-with-bypass hit ratios, where all three ran."""
    import pandas as pd

    pick = {}
    for name in ("lru", "belady", CEILING):
        part = sub[(sub["policy"] == name)]
        pick[name] = part.drop_duplicates("capacity").set_index("capacity")["hit_ratio"]
    both = pd.concat(pick, axis=1).dropna().sort_index()
    return both


def fig_gap(plt, panels):
    fig, axes = _grid(plt, len(panels))
    for ax, (title, sub) in zip(axes, panels):
        gap = gap_table(sub)
        if gap.empty:
            ax.text(0.5, 0.5, "needs lru, belady and belady-bypass at one capacity", ha="center",
                    transform=ax.transAxes, fontsize=8)
        else:
            x = np.arange(len(gap))
            lru, bel, bb = (gap[c].to_numpy() for c in ("lru", "belady", CEILING))
            ax.bar(x, lru, label="LRU", color="#888")
            ax.bar(x, bel - lru, bottom=lru, label="+ future for eviction (Belady)", color="#4a7")
            ax.bar(x, bb - bel, bottom=bel, label="+ bypass (Belady-with-bypass)", color="#47c")
            ax.set_xticks(x, [str(c) for c in gap.index])
            ax.legend(fontsize=7)
        ax.set(title=title, xlabel="capacity (slots)", ylabel="hit ratio", ylim=(0, 1.02))
    fig.suptitle("Gap decomposition: LRU -> Belady -> Belady-with-bypass")
    return fig


def winners(sub):
    """Winner per memory budget: at each distinct memory_bytes of the setting, the best cell
    that fits (:func:`simcache.sweeps.winner`). Rows: budget, policy, capacity, hit ratio,
    ms/token, cell."""
    from simcache.sweeps import winner

    out = []
    mem = sub["memory_bytes"].dropna()
    for b in sorted(set(mem.astype(np.int64))):
        w = winner(sub, int(b))
        out.append({"budget_bytes": int(b), "policy": _label(w), "capacity": int(w["capacity"]),
                    "hit_ratio": w["hit_ratio"], "ms_per_token": None if w.get("time_per_token_s") is None
                    else w["time_per_token_s"] * 1e3, "cell": w["cell"]})
    return out


# the report's figures: file name (without .png) -> (title, drawing function)
FIGURES = {
    "hit_ratio_vs_capacity": ("Hit ratio against capacity", fig_hit_ratio),
    "ms_per_token_vs_memory": ("Predicted ms/token against GPU memory", fig_time_memory),
    "gap_decomposition": ("Gap decomposition", fig_gap),
}


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def report_files() -> list[str]:
    """The files :func:`write_report` writes into its folder."""
    return [f"{name}.png" for name in FIGURES] + ["index.html"]


def write_report(frame, folder, source: str = "results") -> list[Path]:
    """Write ``index.html`` and the PNGs into ``folder``; returns their paths."""
    if frame is None or len(frame) == 0:
        raise SimcacheError("the results hold no cells")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SimcacheError(f"--out must be a folder: {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    panels = settings(frame)
    figures = [(name, title, draw(plt, panels)) for name, (title, draw) in FIGURES.items()]
    written, body = [], []
    body.append(f"<h1>simcache sweep report</h1><p>{html.escape(source)}: {len(frame):,} cells, "
                f"{len(panels)} setting(s) (trace x workload x scope).</p>")
    for name, title, fig in figures:
        data = _png(fig)
        with atomic_output(folder / f"{name}.png") as tmp:
            tmp.write_bytes(data)
        written.append(folder / f"{name}.png")
        body.append(f"<h2>{html.escape(title)}</h2><img alt=\"{name}\" src=\"data:image/png;base64,"
                    f"{base64.b64encode(data).decode()}\">")
    body.append("<h2>Winner per memory budget</h2><p>Lowest predicted ms/token among cells whose "
                "resident experts fit the budget (hit ratio breaks ties).</p>")
    for title, sub in panels:
        rows = winners(sub)
        body.append(f"<h3>{html.escape(title)}</h3>")
        if not rows:
            body.append("<p>no cell records its memory (the trace has no expert_bytes)</p>")
            continue
        head = "".join(f"<th>{h}</th>" for h in ("budget", "bytes", "policy", "capacity", "hit ratio", "ms/token",
                                                 "cell"))
        lines = "".join(
            f"<tr><td>{_size(r['budget_bytes'])}</td><td>{r['budget_bytes']}</td><td>{html.escape(r['policy'])}</td><td>{r['capacity']}</td>"
            f"<td>{r['hit_ratio']:.4f}</td><td>{_ms(r['ms_per_token'])}</td>"
            f"<td><code>{r['cell']}</code></td></tr>" for r in rows)
        body.append(f"<table class=\"winners\"><tr>{head}</tr>{lines}</table>")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>simcache sweep report</title>"
            "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    atomic_write_text(folder / "index.html", page)
    return [folder / "index.html"] + written


def plot_curve(curve, path, title: str = "LRU miss-ratio curve") -> Path:
    """The curve of :func:`simcache.mrc.lru_curve` as a PNG: hit ratio against capacity, the
    capacities run directly (below the largest group) marked apart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    caps, hr = curve.capacities, curve.hit_ratio
    stack = caps >= curve.smallest_stack
    ax.plot(caps, hr, "-", color="#47c", lw=1.2)
    ax.plot(caps[stack], hr[stack], "o", ms=3, color="#47c", label="one stack pass")
    if (~stack).any():
        ax.plot(caps[~stack], hr[~stack], "s", ms=4, color="#c74", label="direct runs (< largest group)")
    ax.set(title=title, xlabel="capacity (slots)", ylabel="LRU hit ratio", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = _png(fig)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
