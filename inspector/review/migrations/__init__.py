"""Alembic migrations of the review database, run by :func:`inspector.review.store.migrate` (no alembic.ini)."""
