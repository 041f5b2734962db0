"""PNG plots (matplotlib, Agg backend): the training history, and the two steps every
plot of the program and of the studies shares (:func:`pyplot`, :func:`save_figure`)."""
from __future__ import annotations

import math
import os

PLOTS = (("loss", "training loss", "loss.png"),
         ("knn_acc", "kNN accuracy (%) on held-out data", "knn_acc.png"),
         ("eff_rank", "effective rank of held-out features", "eff_rank.png"))


def pyplot(required: bool = False):
    """``matplotlib.pyplot`` on the Agg backend (files only: runs need no display), or None
    when matplotlib is not installed; ``required=True`` lets that ImportError through."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise
        return None
    return plt


def save_figure(fig, path: str, rect=None, **savefig_kw) -> str:
    """Lay ``fig`` out (``tight_layout``, within ``rect`` if given), write it to ``path``
    (``savefig_kw`` go to ``savefig``) and close it (pyplot keeps every open figure
    alive); returns ``path``."""
    import matplotlib.pyplot as plt
    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    fig.savefig(path, **savefig_kw)
    plt.close(fig)
    return path


def plot_history(history: list[dict], out_dir: str, title: str = "") -> list[str]:
    """One PNG per curve (loss, kNN accuracy, effective rank) vs epoch; returns the paths
    written (none if matplotlib is missing or there is nothing to plot)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for key, label, name in PLOTS:
        pts = [(r["epoch"], r[key]) for r in history
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        if key == "eff_rank" and any(isinstance(r.get("proj_eff_rank"), float) for r in history):
            q = [(r["epoch"], r["proj_eff_rank"]) for r in history
                 if isinstance(r.get("proj_eff_rank"), float) and math.isfinite(r["proj_eff_rank"])]
            ax.plot([p[0] for p in q], [p[1] for p in q], marker="s", label="projector output")
            ax.lines[0].set_label("backbone")
            ax.legend()
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(title or label, fontsize=9)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, os.path.join(out_dir, name)))
    return paths
