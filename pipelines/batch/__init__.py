"""Batch scoring beyond one machine: a folder, a manifest or a list of millions of paths scored in shards on Dask
or Ray workers through the line's own engine, with Parquet results per shard and a run manifest to resume from.

The pure parts are small modules with no Prefect in them (``sources``: what to score; ``plan``: shards, the run
manifest and what is left to do; ``rows``: one Parquet row per image, written atomically; ``summary``: counts and
the score histogram), ``worker`` is what runs inside a worker process (the bundle fetched and the engine loaded once
per process), and ``flow`` is the thin Prefect flow over them on ``DaskTaskRunner`` or ``RayTaskRunner``.
"""

from pipelines.batch.plan import RunManifest, Shard, plan_shards
from pipelines.batch.sources import SourceScan, collect_images
from pipelines.batch.worker import ModelSource, ShardJob, ShardReport

__all__ = [
    "ModelSource",
    "RunManifest",
    "Shard",
    "ShardJob",
    "ShardReport",
    "SourceScan",
    "collect_images",
    "plan_shards",
]
