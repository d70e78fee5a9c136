"""Where the line hands scored parts to the recorder: one call after scoring, in the service and the CLI.

Why a module: the scoring route stays a few lines longer and nothing more; everything about what to keep, and
never failing the request over it, is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from inspector.engine import Inspector, ScoreResult
from inspector.review.recorder import Recorder

if TYPE_CHECKING:
    from fastapi import Request

    from inspector.service.holder import LoadedModel
    from inspector.service.schemas import ImageScore
    from inspector.service.uploads import Upload


def part_type_of(inspector: Inspector) -> str:
    """A bundle is one part type: its model name (``part`` when the bundle names none)."""
    return str(inspector.bundle.spec.model.get("name") or "part")


def record_scored(
    request: Request,
    model: LoadedModel,
    uploads: Sequence[Upload],
    results: Sequence[ImageScore],
    part_type: str | None = None,
) -> None:
    """Offer a request's scored images to the app's recorder (when recording is on); never raises, never waits."""
    review = getattr(request.app.state, "review", None)
    recorder = review.recorder if review is not None else None
    if recorder is None:
        return
    try:
        kind = part_type or part_type_of(model.inspector)
        for upload, result in zip(uploads, results):
            if upload.data is not None and result.error is None:
                recorder.keep(
                    model.inspector,
                    result.name,
                    result.score,
                    result.verdict,
                    result.views,
                    upload.data,
                    kind,
                    model.registry_version,
                )
    except Exception as exc:  # recording must never fail a scoring request
        recorder.failure("error", f"offering a request's parts: {type(exc).__name__}: {exc}")


def record_paths(recorder: Recorder, inspector: Inspector, results: Sequence[ScoreResult]) -> None:
    """``inspector score --record``: offer scored files by their path on the line PC."""
    kind = part_type_of(inspector)
    for result in results:
        if result.error is None and result.anomalous is not None:
            verdict = "anomalous" if result.anomalous else "good"
            recorder.keep(inspector, result.source, result.score, verdict, result.views, Path(result.source), kind)
