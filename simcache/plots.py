"""Figures for `simcache analyze --plots DIR` (matplotlib, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simcache._files import atomic_output
from simcache.analysis import Analysis, transition_matrix

FIGURES = ("transitions.png", "spectra.png", "locality.png", "structure.png", "communities.png")


def _save(fig, path: Path):
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _band(ax, x, layers, name, label, color):
    y = [rec[name] for rec in layers]
    ax.plot(x, y, "o-", color=color, label=label, ms=3)
    nulls = [rec.get(name + "_null") for rec in layers]
    if all(n is not None for n in nulls) and nulls:
        ax.fill_between(x, [n["lo"] for n in nulls], [n["hi"] for n in nulls], color=color, alpha=0.2,
                        label=f"{label}: null, 95%")


def write_plots(a: Analysis, folder) -> list[Path]:
    """Transition heatmaps, spectra, locality and structure by layer, communities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    L = a.num_layers
    x = np.arange(L)
    title = f"{Path(a.source).name}"

    # 1. transition matrices of up to 8 layers
    shown = sorted(set(np.linspace(0, L - 1, min(L, 8)).round().astype(int).tolist()))
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, l in zip(axes.ravel(), shown):
        P, _ = transition_matrix(a.counts[l])
        im = ax.imshow(P, cmap="viridis", vmin=0, vmax=max(P.max(), 1e-9))
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xlabel("next top-1", fontsize=8)
        ax.set_ylabel("top-1", fontsize=8)
    for ax in axes.ravel()[len(shown):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="P(next | current)")
    fig.suptitle(f"{title}: top-1 transition matrices")
    out.append(_save(fig, folder / "transitions.png"))

    # 2. eigenvalue spectra of P, every layer
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in a.layers:
        ax.plot(rec["eigenvalue_moduli"], color="tab:blue", alpha=0.3, lw=1)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("|lambda|")
    ax.set_title(f"{title}: spectra of P (one line per layer)")
    out.append(_save(fig, folder / "spectra.png"))

    # 3. locality by layer, against the random baseline and the null band
    fig, ax = plt.subplots(figsize=(7, 4))
    _band(ax, x, a.layers, "repeat_top1", "top-1 repeat", "tab:blue")
    ax.plot(x, [r["repeat_top1_random"] for r in a.layers], "--", color="tab:blue", lw=1, label="1/E")
    if a.layers[0].get("overlap_any") is not None:
        _band(ax, x, a.layers, "overlap_any", "any top-k overlap", "tab:orange")
        ax.plot(x, [r["overlap_any_random"] for r in a.layers], "--", color="tab:orange", lw=1,
                label="random top-k overlap")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("rate over consecutive tokens")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: routing locality")
    out.append(_save(fig, folder / "locality.png"))

    # 4. spectral structure by layer
    fig, ax = plt.subplots(figsize=(7, 4))
    _band(ax, x, a.layers, "one_minus_abs_lambda2", "1 - |lambda2(P)|", "tab:green")
    _band(ax, x, a.layers, "fiedler", "Fiedler (normalised Laplacian)", "tab:red")
    _band(ax, x, a.layers, "modularity", "modularity of spectral communities", "tab:purple")
    ax.set_xlabel("MoE layer")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: spectral structure against the null")
    out.append(_save(fig, folder / "structure.png"))

    # 5. communities: the layer of highest modularity, experts reordered by community
    best = max(a.layers, key=lambda r: r["modularity"])
    labels = np.array(best["community_labels"])
    order = np.argsort(labels, kind="stable")
    P, _ = transition_matrix(a.counts[best["layer"]])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(P[np.ix_(order, order)], cmap="viridis")
    edges = np.flatnonzero(np.diff(labels[order])) + 0.5
    for e in edges:
        ax.axhline(e, color="white", lw=0.8)
        ax.axvline(e, color="white", lw=0.8)
    ax.set_title(f"layer {best['layer']}: {best['communities']} communities, "
                 f"modularity {best['modularity']:.3f}", fontsize=9)
    ax.set_xlabel("experts, by community")
    out.append(_save(fig, folder / "communities.png"))
    return out
