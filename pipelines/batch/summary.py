"""What a batch run came to: counts, the flagged rate and the score histogram, from its shard files.

Written to ``<out>/summary.json`` and ``<out>/score_histogram.png`` by every run; when the model came from a
registry, also logged to MLflow beside the model version it scored with (:func:`log_to_mlflow`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.batch.rows import read_results


@dataclass(frozen=True)
class BatchSummary:
    images: int
    scored: int
    errors: int
    flagged: int
    threshold: float | None
    model: str
    model_version: str
    shards: int
    score_quantiles: dict[str, float]

    @property
    def flagged_rate(self) -> float:
        """Flagged parts over the images that could be scored (errors are not parts the model judged)."""
        return self.flagged / self.scored if self.scored else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flagged_rate": self.flagged_rate}


def summarize(files: Sequence[Path], model: str, model_version: str) -> tuple[BatchSummary, np.ndarray]:
    """Counts over every row of the shard files, and the scores of the images that could be scored."""
    table = read_results(files, ["score", "verdict", "error", "threshold"])
    error = np.array([e is not None for e in table.column("error").to_pylist()], dtype=bool)
    scores = np.array([s for s, bad in zip(table.column("score").to_pylist(), error) if not bad], dtype=np.float64)
    thresholds = [t for t in table.column("threshold").to_pylist() if t is not None]
    quantiles = (
        {f"p{q}": float(np.quantile(scores, q / 100)) for q in (50, 90, 99)} | {"max": float(scores.max())}
        if len(scores)
        else {}
    )
    summary = BatchSummary(
        images=table.num_rows,
        scored=int((~error).sum()),
        errors=int(error.sum()),
        flagged=sum(v == "anomalous" for v in table.column("verdict").to_pylist()),
        threshold=float(thresholds[0]) if thresholds else None,
        model=model,
        model_version=model_version,
        shards=len(files),
        score_quantiles=quantiles,
    )
    return summary, scores


def histogram_plot(scores: np.ndarray, threshold: float | None, path: Path, title: str) -> Path:
    """The scores' histogram with the threshold drawn in, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(scores):
        ax.hist(scores, bins=min(60, max(10, len(scores) // 20)), color="tab:blue", alpha=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend(loc="upper right")
    ax.set(xlabel="score", ylabel="images", title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_summary(out: Path, summary: BatchSummary) -> Path:
    path = Path(out) / "summary.json"
    path.write_text(json.dumps(summary.to_dict(), indent=1))
    return path


def log_to_mlflow(
    summary: BatchSummary, name: str, version: str, artifacts: Sequence[Path], tags: dict[str, str]
) -> str:
    """Log the summary as an MLflow run in the experiment of the run that made ``name`` version ``version``, tagged
    with the version, so the batch results sit beside the model they were scored with. Returns the run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    source_run = client.get_model_version(name, version).run_id
    experiment_id = client.get_run(source_run).info.experiment_id if source_run else None
    metrics = {
        "images": summary.images,
        "scored": summary.scored,
        "errors": summary.errors,
        "flagged": summary.flagged,
        **({"flagged_rate": summary.flagged_rate} if summary.scored else {}),
        **{f"score_{k}": v for k, v in summary.score_quantiles.items()},
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"score-batch {name} v{version}") as run:
        mlflow.set_tags(
            {
                "inspector.batch": "score-batch",
                "model_name": name,
                "model_version": version,
                "model_source_run": source_run or "",
                **tags,
            }
        )
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), "score_batch")
    return str(run.info.run_id)
