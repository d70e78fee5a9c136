"""What the line keeps for review, and for how long: the recording settings ``inspector serve`` and
``inspector score --record`` share.

Why a model of its own: the same fields (``INSPECTOR_RECORD_*``) configure the service, the CLI and the
stand-alone review page, so they are one pydantic model that the service's settings extend.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from inspector.settings import RuntimeSettings


def default_record_dir() -> Path:
    """``~/.local/share/inspector/review``: the kept images, heatmaps and the SQLite database by default."""
    return Path.home() / ".local" / "share" / "inspector" / "review"


class RecordingSettings(RuntimeSettings):
    """Recording is off unless ``record`` is set; everything else has a default that works on a line PC."""

    record: bool = Field(False, description="keep flagged parts and a sample of passed ones for review")
    record_dir: Path | None = Field(None, description="where kept images and heatmaps go (default ~/.local/share/…)")
    record_db: str | None = Field(
        None, description="SQLAlchemy URL of the review database (default sqlite:///<record_dir>/review.db)"
    )
    record_passed: float = Field(0.02, ge=0.0, le=1.0, description="share of passed parts kept (flagged: all)")
    record_days: float = Field(90.0, gt=0, description="kept parts older than this many days are purged")
    record_max_mb: float = Field(2048.0, gt=0, description="disk budget of the kept images and heatmaps, MiB")
    record_queue: int = Field(256, ge=1, description="parts waiting to be written; more are dropped and counted")
    reviewer_token: SecretStr | None = Field(None, description="token for /review (default: the service's token)")

    def recording_dir(self) -> Path:
        return (self.record_dir or default_record_dir()).expanduser()

    def database_url(self) -> str:
        """``record_db``, or a SQLite file in the recording folder (created)."""
        if self.record_db:
            return self.record_db
        folder = self.recording_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder.resolve() / 'review.db'}"
