"""The study's report: a Table-2-style Markdown table, a Figure-1-style PNG, curves, and a verdict.

From the per-epoch records of one recipe (its hash): each run's reported error is the median
validation error over the recipe's final epochs; each (regime, norm, batch) cell shows the mean
and spread (sample standard deviation) over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

NORM_ORDER = ("bn", "syncbn", "gn", "ln", "in", "gn+ws")
COLORS = {"bn": "tab:blue", "syncbn": "tab:cyan", "gn": "tab:red", "ln": "tab:green", "in": "tab:purple",
          "gn+ws": "tab:orange"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def run_results(records: list[dict], config: str, final_epochs: int, epochs: int | None = None) -> dict:
    """(sampling, norm, batch, seed) -> per-run result, for runs of ``config`` that finished."""
    by_run = defaultdict(list)
    for r in records:
        if r.get("config") == config:
            by_run[r["sampling"], r["norm"], r["batch"], r["seed"]].append(r)
    out = {}
    for key, recs in by_run.items():
        recs = sorted({r["epoch"]: r for r in recs}.values(), key=lambda r: r["epoch"])
        if epochs is not None and len(recs) < epochs:
            continue  # unfinished run
        last = recs[-final_epochs:]
        # the probe's chunks follow the run's worker sampling and SyncBN's global batch; records
        # without the tag (before session 8) are right only for BN's iid runs, the rest are left out
        untagged = "iid" if key[1] == "bn" else None
        noise = [r["bn_noise"] for r in recs if "bn_noise" in r and r.get("bn_noise_probe", untagged) == key[0]]
        out[key] = {
            "val_error": statistics.median(r["val_error"] for r in last),
            "train_error": statistics.median(r["train_error"] for r in last),
            "seconds": sum(r["epoch_seconds"] for r in recs),
            "cpu_seconds": sum(r.get("epoch_cpu_seconds", 0.0) for r in recs),
            "activation_bytes": recs[-1].get("saved_activation_bytes_per_worker"),
            "max_rss_bytes": max(r.get("max_rss_bytes", 0) for r in recs),
            "curve_val": [r["val_error"] for r in recs],
            "curve_train": [r["train_error"] for r in recs],
            "bn_noise": noise[-1] if noise else None,
        }
    return out


def summarize(results: dict) -> dict:
    """(sampling, norm, batch) -> mean/spread over seeds of the run results."""
    cells = defaultdict(list)
    for (sampling, norm, batch, seed), res in results.items():
        cells[sampling, norm, batch].append(res)
    summary = {}
    for key, runs in cells.items():
        val = [r["val_error"] for r in runs]
        summary[key] = {
            "mean": _mean_std(val)[0], "std": _mean_std(val)[1], "seeds": len(runs),
            "train_mean": _mean_std([r["train_error"] for r in runs])[0],
            "seconds": statistics.fmean(r["seconds"] for r in runs),
            "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
            "activation_bytes": runs[0]["activation_bytes"],
            "mean_rel_err": _noise(runs, "mean_rel_err"),
            "var_rel_err": _noise(runs, "var_rel_err"),
        }
    return summary


def _noise(runs, key):
    vals = [statistics.fmean(layer[key] for layer in r["bn_noise"]) for r in runs if r["bn_noise"]]
    return statistics.fmean(vals) if vals else None


def _axes(summary):
    regimes = sorted({k[0] for k in summary}, key=lambda s: (s != "iid", s))
    norms = sorted({k[1] for k in summary}, key=lambda n: NORM_ORDER.index(n) if n in NORM_ORDER else 99)
    batches = sorted({k[2] for k in summary}, reverse=True)
    return regimes, norms, batches


def _cell(s):
    if s is None:
        return "-"
    if math.isnan(s["std"]):
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def markdown_table(summary: dict) -> str:
    regimes, norms, batches = _axes(summary)
    head = "| val error (%) | " + " | ".join(f"N = {b}" for b in batches) + " |"
    lines = [head, "|---" * (len(batches) + 1) + "|"]
    for regime in regimes:
        for norm in norms:
            if not any((regime, norm, b) in summary for b in batches):
                continue
            label = norm if regime == "iid" else f"{norm} ({regime}-sorted workers)"
            lines.append(f"| {label} | " + " | ".join(_cell(summary.get((regime, norm, b))) for b in batches) + " |")
    return "\n".join(lines)


def cost_table(summary: dict) -> str:
    """Seconds per run and activation memory per worker, by batch size (the first norm that has it)."""
    regimes, norms, batches = _axes(summary)
    lines = ["| per run | " + " | ".join(f"N = {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for norm in norms:
        cells = [summary.get((regimes[0], norm, b)) for b in batches]
        lines.append(f"| {norm}: wall s (CPU s) | " + " | ".join(
            "-" if c is None else f"{c['seconds']:.0f} ({c['cpu_seconds']:.0f})" for c in cells) + " |")
    for norm in norms:
        cells = [summary.get((regimes[0], norm, b)) for b in batches]
        lines.append(f"| {norm}: activations / worker (MB) | " + " | ".join(
            "-" if c is None or c["activation_bytes"] is None else f"{c['activation_bytes'] / 2**20:.1f}"
            for c in cells) + " |")
    return "\n".join(lines)


def console_table(summary: dict) -> str:
    regimes, norms, batches = _axes(summary)
    width = 15
    lines = ["norm".ljust(22) + "".join(f"N={b}".rjust(width) for b in batches)]
    for regime in regimes:
        for norm in norms:
            if any((regime, norm, b) in summary for b in batches):
                label = norm if regime == "iid" else f"{norm} [{regime}]"
                lines.append(label.ljust(22) + "".join(_cell(summary.get((regime, norm, b))).rjust(width) for b in batches))
    return "\n".join(lines)


def verdict(summary: dict, regime: str = "iid") -> str:
    """One line, from the numbers: BN's growth from the largest to the smallest batch, GN's range."""
    _, _, batches = _axes(summary)
    parts = []
    bn = {b: summary[regime, "bn", b] for b in batches if (regime, "bn", b) in summary}
    gn = {b: summary[regime, "gn", b] for b in batches if (regime, "gn", b) in summary}
    if len(bn) >= 2:
        big, small = max(bn), min(bn)
        change = bn[small]["mean"] - bn[big]["mean"]
        how = f"grows by {change:+.2f}" if change >= 0 else f"falls by {-change:.2f}"
        parts.append(f"BN's error {how} points from N={big} "
                     f"({bn[big]['mean']:.2f}%) to N={small} ({bn[small]['mean']:.2f}%)")
        if 2 in bn and small != 2:
            parts[-1] += f", {bn[2]['mean'] - bn[big]['mean']:+.2f} at N=2"
    if len(gn) >= 2:
        means = [s["mean"] for s in gn.values()]
        parts.append(f"GN's varies by {max(means) - min(means):.2f} points across N={max(gn)}..{min(gn)} "
                     f"({min(means):.2f}-{max(means):.2f}%)")
    if bn and gn and max(bn) == max(gn):
        b = max(bn)
        parts.append(f"at N={b} GN is {gn[b]['mean'] - bn[b]['mean']:+.2f} points from BN")
    if not parts:
        return "Verdict: needs bn and gn runs at two or more batch sizes."
    regime_note = "" if regime == "iid" else f" ({regime}-sorted workers)"
    return "Verdict" + regime_note + ": " + "; ".join(parts) + "."


def paper_targets(summary: dict, regime: str = "iid") -> list[tuple[str, bool | None, str]]:
    """The issue's result targets, each (description, met?, numbers)."""
    def get(norm, b):
        return summary.get((regime, norm, b))

    out = []
    _, _, batches = _axes(summary)
    if not batches:
        return out
    big = max(batches)
    bnb, gnb, bn2 = get("bn", big), get("gn", big), get("bn", 2)
    if bnb and gnb:
        diff = gnb["mean"] - bnb["mean"]
        out.append((f"GN at N={big} within 1.0 point of BN at N={big}", abs(diff) <= 1.0, f"{diff:+.2f}"))
    if bnb and bn2:
        diff = bn2["mean"] - bnb["mean"]
        out.append((f"BN at N=2 at least 2 points worse than at N={big}", diff >= 2.0, f"{diff:+.2f}"))
    gns = [get("gn", b) for b in batches if get("gn", b)]
    if len(gns) >= 2:
        spread = max(s["mean"] for s in gns) - min(s["mean"] for s in gns)
        out.append(("GN's spread across batch sizes at most 1.0 point", spread <= 1.0, f"{spread:.2f}"))
    return out


# ----------------------------------------------------------------------------- figures

def figure(summary: dict, path: Path, title: str = "") -> None:
    """Figure 1 of the paper: val error vs per-worker batch (log2 x), error bars over seeds;
    beside it the BN-noise diagnostic: relative error of per-worker batch statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes, norms, batches = _axes(summary)
    has_noise = any(s["mean_rel_err"] is not None for s in summary.values())
    series = len({k[:2] for k in summary})
    crowded = series > 4  # legends go below the panels, not over the curves
    rows = series if crowded else 0  # lines of the noise panel's legend: 2 entries a series, 2 columns
    fig, axes = plt.subplots(1, 2 if has_noise else 1, figsize=(11 if has_noise else 6, 4.2 + 0.17 * rows),
                             squeeze=False)
    ax = axes[0, 0]
    for regime in regimes:
        for norm in norms:
            pts = [(b, summary[regime, norm, b]) for b in batches if (regime, norm, b) in summary]
            if not pts:
                continue
            xs = [b for b, _ in pts]
            ys = [s["mean"] for _, s in pts]
            es = [0 if math.isnan(s["std"]) else s["std"] for _, s in pts]
            label = norm.upper() if regime == "iid" else f"{norm.upper()} ({regime}-sorted)"
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color=COLORS.get(norm),
                        linestyle="-" if regime == "iid" else "--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.invert_xaxis()
    ax.set_xlabel("images per worker (N)")
    ax.set_ylabel("validation error (%)")
    ax.set_title(title or "error vs per-worker batch size")
    ax.grid(alpha=0.3)
    _legend(ax, crowded)
    if has_noise:
        ax2 = axes[0, 1]
        for regime in regimes:
            for norm in norms:
                pts = [(b, summary[regime, norm, b]) for b in batches
                       if (regime, norm, b) in summary and summary[regime, norm, b]["mean_rel_err"] is not None]
                if not pts:
                    continue
                xs = [b for b, _ in pts]
                style = "-" if regime == "iid" else "--"
                tag = norm.upper() + ("" if regime == "iid" else f" ({regime})")
                ax2.plot(xs, [s["mean_rel_err"] for _, s in pts], "o" + style, color=COLORS.get(norm),
                         label=f"{tag}: |mean_B - mean| / std")
                ax2.plot(xs, [s["var_rel_err"] for _, s in pts], "s" + style, color=COLORS.get(norm), alpha=0.5,
                         label=f"{tag}: |var_B - var| / var")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xticks(batches, [str(b) for b in batches])
        ax2.invert_xaxis()
        ax2.set_xlabel("images per worker (N)")
        ax2.set_ylabel("relative error of batch statistics")
        ax2.set_title("BN's batch statistics vs the population's\n(mean over layers, end of training)")
        ax2.grid(alpha=0.3, which="both")
        _legend(ax2, crowded, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _legend(ax, below: bool, fontsize=None) -> None:
    if below:
        ax.legend(fontsize=fontsize or 8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    else:
        ax.legend(fontsize=fontsize)


def curves(results: dict, path: Path) -> None:
    """Training (dashed) and validation (solid) error per epoch, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    batches = sorted({k[2] for k in results}, reverse=True)
    keys = sorted({(k[0], k[1]) for k in results})
    cols = min(3, len(batches))
    rows = math.ceil(len(batches) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, b in zip(axes.flat, batches):
        for sampling, norm in keys:
            runs = [r for k, r in results.items() if k[:3] == (sampling, norm, b)]
            if not runs:
                continue
            n = min(len(r["curve_val"]) for r in runs)
            val = [statistics.fmean(r["curve_val"][i] for r in runs) for i in range(n)]
            tr = [statistics.fmean(r["curve_train"][i] for r in runs) for i in range(n)]
            label = norm if sampling == "iid" else f"{norm} ({sampling})"
            epochs = range(1, n + 1)
            ax.plot(epochs, val, "-", color=COLORS.get(norm), label=f"{label} val")
            ax.plot(epochs, tr, ":", color=COLORS.get(norm), label=f"{label} train")
        ax.set_title(f"N = {b} per worker")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(batches):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("error (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- everything

def write_report(records: list[dict], config: str, recipe: dict, out: Path, wall_seconds: float | None = None,
                 data_description: str = "", command: str = "") -> dict:
    """Write summary.md, figure.png, curves.png into ``out``; return the texts for the console."""
    results = run_results(records, config, recipe["final_epochs"], recipe["epochs"])
    summary = summarize(results)
    out = Path(out)
    if not summary:
        return {"table": "(no finished runs)", "verdict": "Verdict: no finished runs yet.", "summary": summary}
    title = f"{recipe['model']} w{recipe['width']} on {data_description.split(':')[0] or recipe['data']}, {recipe['workers']} workers"
    figure(summary, out / "figure.png", title)
    curves(results, out / "curves.png")
    regimes = _axes(summary)[0]
    verdicts = [verdict(summary, r) for r in regimes]
    md = [f"# groupnorm study {config}", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    if data_description:
        md += [f"Data: {data_description}", ""]
    md += ["Recipe (shared by every run; LR = lr x N/32): " + ", ".join(f"{k}={v}" for k, v in recipe.items()), ""]
    seeds = sorted({s["seeds"] for s in summary.values()})
    seed_note = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds per cell; no ± = one seed"
    md += [f"Validation error (%), median of the last {recipe['final_epochs']} epochs, mean ± sample std over "
           f"seeds ({seed_note}); N = images per worker:", "",
           markdown_table(summary), ""]
    md += [*verdicts, ""]
    targets = paper_targets(summary)
    if targets:
        md += ["Paper-finding checks: " + "; ".join(f"{d}: {'yes' if ok else 'no'} ({v})" for d, ok, v in targets), ""]
    md += ["Cost per run (wall and CPU seconds, mean over seeds; activations = bytes autograd saves for the "
           "backward per worker per step, measured with saved_tensors_hooks):", "", cost_table(summary), ""]
    if wall_seconds is not None:
        md += [f"Wall time of this invocation: {wall_seconds / 60:.1f} min.", ""]
    md += ["![error vs batch](figure.png)", "", "![curves](curves.png)", ""]
    (out / "summary.md").write_text("\n".join(md))
    return {"table": console_table(summary), "verdict": "\n".join(verdicts), "summary": summary, "targets": targets}
