"""PNG of time and memory vs vocabulary / class count / batch size, fused vs
reference, log-log (matplotlib with the Agg backend, optional)."""
from collections import defaultdict

VARIANT_STYLE = {"fused": ("tab:blue", "o", "-"), "reference": ("tab:red", "s", "--"),
                 "torch.compile(reference)": ("tab:orange", "^", ":"), "bare GEMMs": ("tab:gray", "x", ":")}


class PlotUnavailable(RuntimeError):
    pass


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def series(rows):
    """{(op, dtype, fixed dims): {variant: [(size, full_ms, extra_bytes or None, status)]}}"""
    out = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("status") != "ok":
            continue
        fixed = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k != row["size_dim"])
        key = (row["op"], row["size_dim"], row["dtype"], fixed)
        for name, r in row["variants"].items():
            if r.get("status") in ("ok", "oom"):
                ok = r["status"] == "ok"
                out[key][name].append((row["size"], r["full_ms"] if ok else None,
                                       r["peak_extra_bytes"] if ok else r.get("estimated_bytes"), r["status"]))
    return out


def plot(rows, path, title=None):
    plt = _matplotlib()
    groups = series(rows)
    if not groups:
        raise PlotUnavailable("nothing to plot (no op ran)")
    # up to 3 ops per row of panels; each op gets a time panel above a memory panel
    cols = min(3, len(groups))
    bands = -(-len(groups) // cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(4.6 * cols, 6.4 * bands), squeeze=False)
    for i in range(len(groups), bands * cols):  # empty slots of the last band
        band, col = divmod(i, cols)
        axes[2 * band][col].set_visible(False)
        axes[2 * band + 1][col].set_visible(False)
    for i, ((op, size_dim, dtype, fixed), variants) in enumerate(sorted(groups.items())):
        band, col = divmod(i, cols)
        t_ax, m_ax = axes[2 * band][col], axes[2 * band + 1][col]
        for name, points in variants.items():
            points.sort()
            color, marker, ls = VARIANT_STYLE.get(name, (None, "d", "-."))
            ok = [p for p in points if p[3] == "ok"]
            if ok:
                t_ax.plot([p[0] for p in ok], [p[1] for p in ok], marker=marker, ls=ls, color=color, label=name)
                m_ax.plot([p[0] for p in ok], [p[2] / 2**20 for p in ok], marker=marker, ls=ls, color=color,
                          label=name)
            # OOM points: the memory the variant would have needed, as a hollow marker
            oom = [p for p in points if p[3] == "oom" and p[2]]
            if oom:
                m_ax.plot([p[0] for p in oom], [p[2] / 2**20 for p in oom], marker=marker, ls="none",
                          mfc="none", color=color, label=f"{name} (OOM, estimate)")
        t_ax.set_title(f"{op} ({dtype})\n{fixed}", fontsize=9)
        t_ax.set_ylabel("fwd+bwd time (ms)")
        m_ax.set_ylabel("peak memory above inputs (MiB)")
        for ax in (t_ax, m_ax):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(size_dim)
            ax.grid(True, which="both", alpha=0.3)
        t_ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
