"""Kept parts, reviews and exports.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kept_parts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("part_type", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("registry_version", sa.String(32), nullable=True),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("image", sa.String(1024), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("stored_bytes", sa.Integer(), nullable=False),
        sa.Column("heatmap", sa.String(1024), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("views", sa.JSON(), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("kept", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
    )
    for column in ("recorded_at", "part_type", "model_version", "image_sha256", "verdict"):
        op.create_index(f"ix_kept_parts_{column}", "kept_parts", [column])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("part_id", sa.Integer(), sa.ForeignKey("kept_parts.id"), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(128), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
    )
    op.create_index("ix_reviews_part_id", "reviews", ["part_id"])
    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_review_id", sa.Integer(), nullable=False),
        sa.Column("false_rejects", sa.Integer(), nullable=False),
        sa.Column("defects", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("exports")
    op.drop_index("ix_reviews_part_id", "reviews")
    op.drop_table("reviews")
    for column in ("recorded_at", "part_type", "model_version", "image_sha256", "verdict"):
        op.drop_index(f"ix_kept_parts_{column}", "kept_parts")
    op.drop_table("kept_parts")
