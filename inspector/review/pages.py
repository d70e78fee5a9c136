"""The review page and its JSON API under ``/review``: kept parts newest first, photo beside heatmap, filters, a
reviewer's decision per part, and the day-by-day plots.

Why a router of its own: the same routes serve inside ``inspector serve`` (beside scoring) and alone
(``inspector review``, on a PC with the database but no model). A browser cannot send a bearer header when it
opens a page, so the page signs in once (name and token, ``POST /review/api/login``) and gets an HttpOnly cookie;
scripts may send ``Authorization: Bearer`` instead. Every decision is stored with the reviewer's name and time.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import date
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, SecretStr
from sqlalchemy.exc import SQLAlchemyError

from inspector.review.context import ReviewContext, open_review
from inspector.review.settings import RecordingSettings
from inspector.review.store import DayStats, PartFilter, PartView, ReviewError

TOKEN_COOKIE = "inspector_review_token"
REVIEWER_COOKIE = "inspector_reviewer"
PAGE = Path(__file__).with_name("page.html")
#: score / threshold ratios the histograms bin (the last bin also holds everything above)
RATIO_EDGES = [round(0.1 * i, 1) for i in range(26)]

router = APIRouter(prefix="/review")


def get_review(request: Request) -> ReviewContext:
    review: ReviewContext | None = getattr(request.app.state, "review", None)
    if review is None:
        raise HTTPException(404, detail="review is off: start the service with --record (INSPECTOR_RECORD=1)")
    return review


Review = Annotated[ReviewContext, Depends(get_review)]


def _token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.strip().encode(), expected.encode())


def require_reviewer(request: Request, review: Review) -> str:
    """401 unless the request carries the token (cookie or bearer header); the reviewer's name, as signed in."""
    if review.token is not None:
        expected = review.token.get_secret_value()
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        cookie = request.cookies.get(TOKEN_COOKIE)
        if not (_token_matches(cookie, expected) or (scheme.lower() == "bearer" and _token_matches(bearer, expected))):
            raise HTTPException(401, detail="sign in to review: missing or wrong reviewer token")
    return request.cookies.get(REVIEWER_COOKIE) or request.headers.get("x-reviewer", "")


Reviewer = Annotated[str, Depends(require_reviewer)]


class Login(BaseModel):
    reviewer: str = Field(min_length=1, max_length=128)
    token: str = ""


class Decision(BaseModel):
    decision: Literal["good", "defect"]
    defect_type: str | None = Field(None, max_length=128)
    note: str | None = Field(None, max_length=2000)
    reviewer: str | None = Field(None, max_length=128, description="who decides, when not signed in by cookie")


class DayPlot(BaseModel):
    """One day on the page's plots."""

    day: date
    histogram: list[int]
    flagged: int
    flagged_rate: float | None
    reviewed: int
    confirmed_false_reject_share: float | None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def ratio_histogram(ratios: Sequence[float], edges: Sequence[float] = RATIO_EDGES) -> list[int]:
    """Counts of score / threshold per bin of ``edges`` (the last bin open above; NaN left out)."""
    counts = [0] * (len(edges) - 1)
    for r in ratios:
        if math.isnan(r):
            continue
        i = next((k for k in range(len(edges) - 1) if r < edges[k + 1]), len(edges) - 2)
        counts[max(i, 0)] += 1
    return counts


def day_plot(d: DayStats) -> DayPlot:
    total = d.flagged + d.passed
    return DayPlot(
        day=d.day,
        histogram=ratio_histogram(d.ratios),
        flagged=d.flagged,
        flagged_rate=_finite(d.flagged / total) if total else None,
        reviewed=d.flagged_reviewed,
        confirmed_false_reject_share=d.flagged_good / d.flagged_reviewed if d.flagged_reviewed else None,
    )


@contextmanager
def database() -> Iterator[None]:
    """A database that is down answers 503 with what SQLAlchemy said, never a 500."""
    try:
        yield
    except SQLAlchemyError as exc:
        detail = f"review database unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise HTTPException(503, detail=detail) from None


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def page(_: Review) -> HTMLResponse:
    """The page itself (404 with the reason while recording is off); it signs in and loads parts by itself."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.post("/api/login")
async def login(body: Login, review: Review) -> JSONResponse:
    """Check the token and set the sign-in cookies (HttpOnly token, the reviewer's name for the audit trail)."""
    if review.token is not None and not _token_matches(body.token, review.token.get_secret_value()):
        raise HTTPException(401, detail="wrong reviewer token")
    response = JSONResponse({"reviewer": body.reviewer.strip()})
    response.set_cookie(TOKEN_COOKIE, body.token, httponly=True, samesite="strict", path="/review")
    response.set_cookie(REVIEWER_COOKIE, body.reviewer.strip(), samesite="strict", path="/review")
    return response


@router.get("/api/parts", response_model=list[PartView])
def parts(
    review: Review,
    _: Reviewer,
    day: date | None = None,
    model_version: str | None = None,
    part_type: str | None = None,
    verdict: Literal["anomalous", "good"] | None = None,
    reviewed: bool | None = None,
    before: int | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[PartView]:
    """Kept parts, newest first, filtered; page on with ``before`` (the last id seen)."""
    with database():
        return review.store.parts(PartFilter(day, model_version, part_type, verdict, reviewed), limit, before)


@router.get("/api/choices")
def choices(review: Review, _: Reviewer) -> dict[str, list[str]]:
    with database():
        return review.store.choices()


@router.get("/api/days", response_model=list[DayPlot])
def days(
    review: Review,
    _: Reviewer,
    last: Annotated[int, Query(ge=1, le=366)] = 14,
    model_version: str | None = None,
    part_type: str | None = None,
) -> list[DayPlot]:
    """Per day: the score / threshold histogram, the flagged rate and the reviewers' confirmed false-reject share."""
    with database():
        stats = review.store.days(last, PartFilter(model_version=model_version, part_type=part_type))
    return [day_plot(d) for d in stats]


@router.post("/api/parts/{part_id}/review", response_model=PartView)
def decide(part_id: int, body: Decision, review: Review, reviewer: Reviewer) -> PartView:
    """Record a reviewer's decision (good: a false reject; defect: with its type)."""
    try:
        with database():
            return review.store.add_review(
                part_id, body.decision, body.reviewer or reviewer, body.defect_type, body.note
            )
    except ReviewError as exc:
        raise HTTPException(404 if "no such kept part" in str(exc) else 422, detail=str(exc)) from None


@router.get("/parts/{part_id}/{which}", include_in_schema=False)
def part_file(part_id: int, which: Literal["image", "heatmap"], review: Review, _: Reviewer) -> FileResponse:
    with database():
        path = review.store.file_of(part_id, which)
    if path is None or not path.is_file():
        raise HTTPException(404, detail=f"part {part_id}: no {which} (purged, or never drawn)")
    return FileResponse(path)


def create_review_app(settings: RecordingSettings, token: SecretStr | None = None) -> FastAPI:
    """``inspector review``: the page alone, over the database, with no model and no recording."""
    review = open_review(settings, token=token, recording=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            review.stop()

    app = FastAPI(title="inspector review", lifespan=lifespan)
    app.state.review = review
    app.include_router(router)
    return app
