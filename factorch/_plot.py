"""The per-layer plot of a compression report (matplotlib, optional)."""

from __future__ import annotations


def plot_report(report, path) -> None:
    """Two panels over the layers in model order: the fraction of each
    weight's parameters kept (1 = kept dense), and its weight and output
    errors. Written as a PNG to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("report plots need matplotlib: pip install 'factorch[plot]'") from e
    layers = report.layers
    x = range(len(layers))
    kept = [lr.params_after / lr.params_before for lr in layers]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, len(layers) * 0.06 + 4), 6), sharex=True)
    a.bar(x, kept, width=1.0, color="tab:blue")
    a.axhline(report.kept, color="k", lw=0.8, ls="--", label=f"total kept {report.kept:.2f}")
    a.set_ylabel("parameters kept")
    a.set_ylim(0, 1.05)
    a.legend(loc="lower right")
    a.set_title(f"factorch.compress: method={report.method}, allocation={report.allocation}, "
                f"ratio={report.ratio}")
    b.plot(x, [lr.weight_error for lr in layers], ".", label="weight error ‖W−Ŵ‖/‖W‖")
    if any(lr.output_error is not None for lr in layers):
        b.plot(x, [lr.output_error if lr.output_error is not None else float("nan")
                   for lr in layers], ".", label="output error ‖(W−Ŵ)X‖/‖WX‖")
    b.set_ylabel("relative error")
    b.set_xlabel("layer (model order)")
    b.legend(loc="upper right")
    step = max(1, len(layers) // 12)
    b.set_xticks(list(x)[::step])
    b.set_xticklabels([layers[i].name.replace("model.", "") for i in list(x)[::step]],
                      rotation=60, ha="right", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
