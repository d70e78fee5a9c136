"""Evaluation plots for the MLflow run: ROC and PR curves, score histograms with the threshold, worst examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.evaluation import Evaluation


def _curves(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR, recall, precision over every threshold (descending scores)."""
    order = np.argsort(-scores, kind="mergesort")
    y = labels[order].astype(bool)
    tp, fp = np.cumsum(y), np.cumsum(~y)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr, tpr = np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
    recall, precision = tp / n_pos, tp / np.maximum(tp + fp, 1)
    return fpr, tpr, recall, precision


def save_evaluation_plots(evaluation: Evaluation, out_dir: Path, *, worst: int = 8) -> list[Path]:
    """Write roc.png, pr.png, score_histogram.png and worst_examples.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    labels, scores = evaluation.labels, evaluation.scores
    fpr, tpr, recall, precision = _curves(labels, scores)
    auroc = evaluation.metrics()["image_auroc"]
    paths = []

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false-reject rate (good flagged)", ylabel="recall (defects caught)", title="ROC")
    ax.legend(loc="lower right")
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(recall, precision)
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.05))
    paths.append(out_dir / "pr.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 30).tolist()
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good")
    for t in sorted(set(np.asarray(evaluation.defect_types)[labels == 1])):
        ax.hist(
            scores[np.asarray(evaluation.defect_types) == t],
            bins=bins,
            alpha=0.5,
            label=t,
            histtype="step",
            linewidth=1.5,
        )
    if np.isfinite(evaluation.threshold):
        ax.axvline(evaluation.threshold, color="red", linestyle="--", label="threshold")
    ax.set(xlabel="anomaly score", ylabel="images", title="score distribution")
    ax.legend(fontsize=7)
    paths.append(out_dir / "score_histogram.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    # the goods scored highest (false-reject candidates) and the defects scored lowest (escape candidates)
    good_idx = [i for i in np.argsort(-scores) if labels[i] == 0][: worst // 2]
    bad_idx = [i for i in np.argsort(scores) if labels[i] == 1][: worst // 2]
    picks = [(i, "good, high score") for i in good_idx] + [
        (i, f"{evaluation.defect_types[i]}, low score") for i in bad_idx
    ]
    if picks:
        fig, axes = plt.subplots(1, len(picks), figsize=(2.2 * len(picks), 2.6), squeeze=False)
        for ax, (i, what) in zip(axes[0], picks):
            with Image.open(evaluation.paths[i]) as img:
                ax.imshow(img.convert("RGB"))
            ax.set_title(f"{what}\n{scores[i]:.3f}", fontsize=7)
            ax.axis("off")
        paths.append(out_dir / "worst_examples.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def save_heatmap_examples(bundle: Path, evaluation: Evaluation, out_dir: Path, *, per_kind: int = 4) -> list[Path]:
    """heatmaps.png: anomaly-heatmap overlays of the highest-scored defects and goods (patch-mode bundles only).

    Drawn by ``inspector.heatmap`` (the line's own code), so the MLflow run shows what ``inspector score --heatmaps``
    will show on the line. Returns [] for an image-level bundle.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inspector.engine import Inspector
    from inspector.heatmap import overlay, score_with_maps

    inspector = Inspector.from_bundle(bundle)
    if inspector.bundle.mode != "patch" or not len(evaluation.scores):
        return []
    order = np.argsort(-evaluation.scores)
    picks = [i for i in order if evaluation.labels[i] == 1][:per_kind] + [
        i for i in order if evaluation.labels[i] == 0
    ][:per_kind]
    drawn = score_with_maps(inspector, [evaluation.paths[i] for i in picks])
    fig, axes = plt.subplots(1, len(picks), figsize=(2.2 * len(picks), 2.8), squeeze=False)
    for ax, i, (result, amap, img) in zip(axes[0], picks, drawn):
        if amap is not None and img is not None:
            ax.imshow(overlay(img, amap, inspector.patch_threshold))
        kind = evaluation.defect_types[i] if evaluation.labels[i] == 1 else "good"
        ax.set_title(f"{kind}\n{result.score if result.score is not None else float('nan'):.3f}", fontsize=7)
        ax.axis("off")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "heatmaps.png"
    fig.suptitle(f"anomaly heatmaps (yellow = patch threshold {inspector.patch_threshold:.3f})", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [path]
