"""PNG plots of a curation's statistics (matplotlib, Agg backend; imported only when a curation finishes).

documents.png: documents and tokens left after each stage; removed.png: what each stage removed, by reason;
lengths.png: the token-length histogram of the input and after each stage.
"""
from __future__ import annotations

from pathlib import Path


def plot_stats(stats: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    stages = stats["stages"]
    names = [s["stage"] for s in stages]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(stages))
    ax.bar(x, [s["documents"] for s in stages], color="tab:blue")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("documents")
    ax2 = ax.twinx()
    ax2.plot(list(x), [s["tokens"] for s in stages], "o-", color="tab:orange")
    ax2.set_ylabel("tokens", color="tab:orange")
    ax2.set_ylim(bottom=0)
    ax.set_title("documents (bars) and tokens (line) after each stage")
    written.append(_save(fig, folder / "documents.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    reasons = sorted({r for s in stages for r in s.get("removed_by_reason", {})})
    left = [0] * len(stages)
    cmap = plt.get_cmap("tab20")
    for i, reason in enumerate(reasons):
        counts = [s.get("removed_by_reason", {}).get(reason, 0) for s in stages]
        ax.barh(names, counts, left=left, label=reason, color=cmap(i % 20))
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("documents removed")
    ax.set_title("removed by stage and reason")
    if reasons:
        ax.legend(fontsize=7, loc="lower right")
    written.append(_save(fig, folder / "removed.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for s in stages:
        h = s["length_histogram"]
        counts, edges = h["counts"], h["edges"]
        if not any(counts):
            continue
        first = next(i for i, c in enumerate(counts) if c)
        # bin i is [edges[i], edges[i+1]): a step from each bin's lower edge (0-token documents drawn at 0.5)
        xs = [max(e, 0.5) for e in edges[first: len(counts) + 1]]
        ys = counts[first:] + [0]
        n = min(len(xs), len(ys))  # the open last bin has no upper edge
        ax.step(xs[:n], ys[:n], where="post", label=s["stage"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (tokens; bins a quarter of a doubling wide)")
    ax.set_ylabel("documents")
    ax.set_title("document lengths")
    ax.legend(fontsize=7)
    written.append(_save(fig, folder / "lengths.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
