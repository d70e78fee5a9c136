"""Anomaly score of a part: its distance to the nearest golden references, and the verdict against a threshold.

Two granularities share one code path. *Image* embeddings (N, D): the score is the distance to the k nearest
reference embeddings. *Patch* embeddings (N, P, D): every patch of the part is compared with a bank of patches
of the golden parts and the part's score is its worst patch (a small scratch is one far patch, which an
image-level average would dilute), less ``ScoringConfig.offset`` times the part's own typical patch distance (a
part that is merely unlike the golden ones all over is not a defect). Pure numpy, so the line, training-time
evaluation and the registry's pyfunc share one implementation. Queries and the bank are scanned in chunks, so a
bank of 100,000 references never needs a full queries x references matrix in memory.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Aggregation = Literal["mean", "max", "min"]


@dataclass(frozen=True)
class ScoringConfig:
    """How distances to the references become one score (stored in the bundle)."""

    distance: Literal["euclidean"] = "euclidean"
    k: int = 1
    aggregation: Aggregation = "mean"
    patch_aggregation: Literal["max"] = "max"
    chunk_size: int = 8192
    offset: float = 0.0  # patch mode: minus this fraction of the part's typical (median) patch distance; see GoldenBank
    content_only: bool = True  # patch mode: score only the patches on the part, never the letterbox padding (``valid``)

    def __post_init__(self) -> None:
        if self.distance != "euclidean":
            raise ValueError(f"unknown distance {self.distance!r}: only 'euclidean' is supported")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.aggregation not in ("mean", "max", "min"):
            raise ValueError(f"unknown aggregation {self.aggregation!r}: use mean, max or min")
        if self.patch_aggregation != "max":
            raise ValueError(f"unknown patch aggregation {self.patch_aggregation!r}: only 'max' is supported")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if not 0.0 <= self.offset <= 1.0:
            raise ValueError(f"offset must be in [0, 1] (a fraction of the typical patch distance), got {self.offset}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        """A stored config (a version-1 bundle's is upgraded by ``inspector.bundle.upgraded_manifest`` first)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def knn_distances(queries: np.ndarray, references: np.ndarray, k: int = 1, chunk_size: int = 8192) -> np.ndarray:
    """Euclidean distances from each query to its k nearest references, ascending: shape (Q, k).

    Queries go in blocks of 1024 and the bank in chunks of ``chunk_size`` rows, keeping a running top-k, so memory
    stays at about ``1024 × chunk_size`` floats whatever the sizes.
    """
    q = np.asarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(references, dtype=np.float32)
    if q.ndim != 2 or r.ndim != 2:
        raise ValueError(f"queries and references must be 2-D, got {q.shape} and {r.shape}")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {q.shape[1]}, references {r.shape[1]}")
    if len(r) == 0:
        raise ValueError("the reference bank is empty: add golden references first")
    return _sqrt(_smallest_sq(q, r, _sq_norms(r), k, chunk_size))


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sqrt(sq: np.ndarray) -> np.ndarray:
    """Distances from squared distances; rounding can make |q|² + |r|² − 2q·r slightly negative."""
    return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)


def _smallest_sq(q: np.ndarray, r: np.ndarray, r_sq: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """The k smallest squared distances of every query to the bank ``r``, ascending: (Q, min(k, len(r)))."""
    k = min(k, len(r))
    block = 1024
    out = [_knn_block(q[i : i + block], r, r_sq, k, chunk_size) for i in range(0, len(q), block)]
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def _knn_block(q: np.ndarray, r: np.ndarray, r_sq: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """k smallest squared distances of a block of queries: one float32 GEMM per bank chunk, |q|² added at the end.

    ``|r|² − 2q·r`` is formed in the GEMM's own output buffer (no extra (Q, chunk) temporaries), and k=1 keeps a
    running minimum instead of sorting.
    """
    best: np.ndarray | None = None
    for start in range(0, len(r), chunk_size):
        partial = q @ r[start : start + chunk_size].T
        partial *= -2.0
        partial += r_sq[None, start : start + chunk_size]
        if k == 1:
            m = partial.min(axis=1, keepdims=True)
            best = m if best is None else np.minimum(best, m, out=best)
            continue
        merged = partial if best is None else np.concatenate([best, partial], axis=1)
        if merged.shape[1] > k:
            merged = np.take_along_axis(merged, np.argpartition(merged, k - 1, axis=1)[:, :k], axis=1)
        best = merged
    assert best is not None
    best.sort(axis=1)
    best += _sq_norms(q)[:, None]
    return best


#: how the k nearest distances of one query become its distance (``ScoringConfig.aggregation``)
_REDUCERS: dict[Aggregation, Callable[..., Any]] = {"mean": np.mean, "max": np.max, "min": np.min}


def _aggregate(sq: np.ndarray, config: ScoringConfig) -> np.ndarray:
    """(Q, k) squared distances to one distance per query (mean, max or min of the k nearest)."""
    d = _sqrt(np.array(sq, dtype=np.float32))
    if d.shape[1] == 1:
        return d[:, 0]
    return _REDUCERS[config.aggregation](d, axis=1).astype(np.float32)


class GoldenBank:
    """The golden reference bank prepared once for repeated scoring, and the exact worst-patch search over it.

    Brute force compares every query patch with every bank patch (32 parts × 196 patches × a 9.4k bank is 7.5
    GFLOP, several times the network's own forward pass on 2 cores), yet a part's score is only its *worst*
    patch. So a large bank is split once into k-means cells; each query patch first searches the ``probes``
    nearest cells, which gives an upper bound on its true nearest-neighbour distance (a subset's nearest is never
    nearer). Each part's highest-bound patch is then searched exactly over the whole bank, and only patches whose
    bound still exceeds that exact distance are searched exactly too; every other patch provably cannot be the
    maximum. The result equals brute force up to float rounding: the cells change the work, never the answer.
    """

    #: Banks smaller than this, or queries fewer than ``min_queries``, are searched by brute force.
    min_partitioned_bank = 2048
    min_queries = 64

    def __init__(
        self,
        references: np.ndarray,
        *,
        cells: int | None = None,
        probes: int = 2,
        seed: int = 0,
        chunk_size: int = 8192,
    ) -> None:
        bank = np.asarray(references, dtype=np.float32)
        if bank.ndim == 3:
            bank = bank.reshape(-1, bank.shape[-1])
        if bank.ndim != 2:
            raise ValueError(f"references must be (M, D) or (R, P, D), got shape {bank.shape}")
        if len(bank) == 0:
            raise ValueError("the reference bank is empty: add golden references first")
        self.vectors = np.ascontiguousarray(bank)
        self.sq_norms = _sq_norms(self.vectors)
        self.chunk_size = chunk_size
        self.probes = probes
        if cells is None:
            cells = _default_cells(len(bank)) if len(bank) >= self.min_partitioned_bank else 0
        self.cells = min(cells, len(bank))
        self._seed = seed
        self._partition: _Partition | None = None
        #: Query patches the last :meth:`anomaly_scores` call searched over the whole bank (benchmark and tests).
        self.last_exact_searches = 0

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.vectors)

    def knn_sq(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Exact k smallest squared distances of each query (Q, D) to the whole bank: (Q, min(k, M))."""
        return _smallest_sq(queries, self.vectors, self.sq_norms, k, self.chunk_size)

    def patch_distances(self, embeddings: np.ndarray, config: ScoringConfig | None = None) -> np.ndarray:
        """Exact per-query (N,) or per-patch (N, P) distance, by brute force (every patch is needed here)."""
        cfg = config or ScoringConfig()
        emb = self._check(embeddings)
        flat = emb.reshape(-1, emb.shape[-1])
        return _aggregate(self.knn_sq(flat, cfg.k), cfg).reshape(emb.shape[:-1])

    def anomaly_scores(
        self, embeddings: np.ndarray, config: ScoringConfig | None = None, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """One score per image: the k-NN distance (image mode) or, in patch mode, the worst patch's distance minus
        ``config.offset`` times the part's typical patch distance (:meth:`worst_and_typical`).

        ``valid`` (N, P): the patches on the part (:meth:`~inspector.preprocess.Preprocessor.content_mask`); with
        ``config.content_only`` the others (letterbox padding) take no part in the score.
        """
        cfg = config or ScoringConfig()
        emb = self._check(embeddings)
        if len(emb) == 0:
            return np.zeros((0,), dtype=np.float32)
        mask = patch_mask(emb, cfg, valid)
        if emb.ndim == 3 and cfg.offset > 0:
            return offset_scores(*self.worst_and_typical(emb, cfg, valid), cfg.offset)
        if emb.ndim == 2 or self.cells <= 1 or emb.shape[0] * emb.shape[1] < self.min_queries:
            d = self.patch_distances(emb, cfg)
            self.last_exact_searches = d.size
            if d.ndim == 1:
                return d
            return d.max(axis=1) if mask is None else np.where(mask, d, -np.inf).max(axis=1).astype(np.float32)
        use_one_blas_thread()
        return self._worst_patch_search(
            emb, cfg, None if mask is None else self._patch_bounds(emb, cfg, mask, fill=-np.inf)
        )

    def worst_and_typical(
        self, embeddings: np.ndarray, config: ScoringConfig | None = None, valid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each part's exact worst-patch distance and its typical patch distance, both (N,), over the ``valid``
        patches (see :meth:`anomaly_scores`).

        Why the typical distance: parts of one product differ as a whole (lighting, surface finish, a later batch
        of material), which moves *every* patch away from the golden bank and a good part's worst patch with them;
        a defect is a patch far from the bank *and* from the rest of its own part. Subtracting a fraction of the
        median patch distance (``ScoringConfig.offset``) discounts the whole-part shift; a fraction below 1 keeps
        part of it, so a part that is wrong all over still scores. The median comes from the same cell search that
        bounds the worst patch (each patch's nearest neighbour within its ``probes`` nearest cells, the exact one for
        about 3 patches in 4, within about 2 % of the exact median on real parts), so it costs no extra search; with
        an unpartitioned bank it is the exact median. It is a fixed function of the bank and the query, so the line,
        calibration and evaluation agree to float rounding.
        """
        cfg = config or ScoringConfig()
        emb = self._check(embeddings)
        if emb.ndim != 3:
            raise ValueError(f"the typical patch distance needs patch embeddings (N, P, D), got shape {emb.shape}")
        if len(emb) == 0:
            return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
        mask = patch_mask(emb, cfg, valid)
        if self.cells <= 1:
            d = self.patch_distances(emb, cfg)
            self.last_exact_searches = d.size
            if mask is None:
                return d.max(axis=1), np.median(d, axis=1).astype(np.float32)
            return np.where(mask, d, -np.inf).max(axis=1).astype(np.float32), _masked_median(d, mask)
        bound = self._patch_bounds(emb, cfg, mask, fill=np.nan)
        typical = np.median(bound, axis=1).astype(np.float32) if mask is None else _masked_median(bound, mask)
        if mask is not None:
            bound[~mask] = -np.inf
        return self._worst_patch_search(emb, cfg, bound), typical

    def typical_distances(
        self, embeddings: np.ndarray, config: ScoringConfig | None = None, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """Each part's typical patch distance (N,), exactly as :meth:`worst_and_typical` computes it."""
        cfg = config or ScoringConfig()
        emb = self._check(embeddings)
        if emb.ndim != 3:
            raise ValueError(f"the typical patch distance needs patch embeddings (N, P, D), got shape {emb.shape}")
        mask = patch_mask(emb, cfg, valid)
        if self.cells <= 1:
            d = self.patch_distances(emb, cfg)
        else:
            d = self._patch_bounds(emb, cfg, mask, fill=np.nan)
        return np.median(d, axis=1).astype(np.float32) if mask is None else _masked_median(d, mask)

    def _patch_bounds(
        self, emb: np.ndarray, cfg: ScoringConfig, mask: np.ndarray | None = None, fill: float = np.nan
    ) -> np.ndarray:
        """Each patch's upper bound (N, P); with ``mask`` only the masked-in patches are searched, the rest get
        ``fill``."""
        use_one_blas_thread()
        flat = emb.reshape(-1, emb.shape[-1])
        if mask is None:
            return self._upper_bounds(np.ascontiguousarray(flat), cfg).reshape(emb.shape[:2])
        out = np.full(emb.shape[:2], fill, dtype=np.float32)
        out[mask] = self._upper_bounds(np.ascontiguousarray(flat[mask.ravel()]), cfg)
        return out

    def _check(self, embeddings: np.ndarray) -> np.ndarray:
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim not in (2, 3):
            raise ValueError(f"embeddings must be (N, D) or (N, P, D), got shape {emb.shape}")
        if emb.shape[-1] != self.dim:
            raise ValueError(f"embedding sizes differ: queries {emb.shape[-1]}, references {self.dim}")
        return emb

    def _worst_patch_search(self, emb: np.ndarray, cfg: ScoringConfig, bound: np.ndarray | None = None) -> np.ndarray:
        n, p, dim = emb.shape
        flat = np.ascontiguousarray(emb.reshape(-1, dim))
        if bound is None:
            bound = self._upper_bounds(flat, cfg).reshape(n, p)
        first = np.argmax(bound, axis=1) + np.arange(n) * p
        scores = _aggregate(self.knn_sq(flat[first], cfg.k), cfg)
        open_ = bound > scores[:, None]
        open_.ravel()[first] = False
        rest = np.flatnonzero(open_)
        self.last_exact_searches = n + len(rest)
        if len(rest):
            np.maximum.at(scores, rest // p, _aggregate(self.knn_sq(flat[rest], cfg.k), cfg))
        return scores

    def partition(self) -> _Partition:
        """The k-means cells, built on first use (a few tens of ms for a 10k bank) and kept."""
        if self._partition is None:
            self._partition = _Partition.build(self.vectors, self.sq_norms, self.cells, seed=self._seed)
        return self._partition

    def _upper_bounds(self, flat: np.ndarray, cfg: ScoringConfig) -> np.ndarray:
        """Each query's k-NN distance within its ``probes`` nearest cells: never below the exact one.

        One pass over the cells: every cell is compared, in one GEMM, with all the queries that probe it.
        """
        part = self.partition()
        k = cfg.k
        best = np.full((len(flat), k), np.inf, dtype=np.float32)
        probes = min(self.probes, self.cells)
        c_dist = flat @ part.centroids.vectors.T
        c_dist *= -2.0
        c_dist += part.centroids.sq_norms
        cell_of_pair = _nearest_columns(c_dist, probes).ravel()
        order = np.argsort(cell_of_pair, kind="stable")
        query_of_pair = order // probes
        bounds = np.searchsorted(cell_of_pair[order], np.arange(self.cells + 1))
        flat_sq = _sq_norms(flat)
        for c in np.flatnonzero(np.diff(bounds)):
            lo, hi = part.start[c], part.start[c + 1]
            if lo == hi:
                continue
            ids = query_of_pair[bounds[c] : bounds[c + 1]]  # each query at most once per cell
            q = flat[ids]
            if k == 1 and len(ids) * (hi - lo) <= 1 << 22:
                g = q @ part.vectors[lo:hi].T
                g *= -2.0
                g += part.sq_norms[lo:hi]
                found = g.min(axis=1, keepdims=True)
                found += flat_sq[ids, None]
            else:
                found = _smallest_sq(q, part.vectors[lo:hi], part.sq_norms[lo:hi], k, self.chunk_size)
            best[ids] = _merge_smallest(best[ids], found, k)
        return _aggregate(best, cfg)


@functools.cache
def _numpy_blas() -> list[Any]:
    """numpy's own BLAS (not torch's or scipy's, which a training process may also have loaded)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an install without it still scores, only slower under contention
        return []
    return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas" and "numpy" in lib.filepath]


_blas_single = threading.Event()


def use_one_blas_thread() -> bool:
    """Put numpy's BLAS on one thread for the rest of the process (idempotent); True once that has taken effect.

    Measured on 2 cores: with BLAS's own 2 threads, the ~100 small GEMMs of a pruned search spend more time
    synchronising and spinning than computing and fight onnxruntime and the decode threads for the cores (CPU
    time of the search 3-9x higher; the HTTP service under 8 clients fell from ~95 to ~27 img/s;
    benchmarks/README.md). The setting is process-wide and kept: OpenBLAS ignores a change made from any thread
    but the main one (measured with OpenBLAS 0.3.31), so a per-call limit from the service's request threads
    does nothing. Called when an :class:`~inspector.engine.Inspector` is built and before each pruned search
    until it holds.
    """
    if _blas_single.is_set():
        return True
    libs = _numpy_blas()
    for lib in libs:
        lib.set_num_threads(1)
    if libs and all(lib.num_threads == 1 for lib in libs):
        _blas_single.set()
    return _blas_single.is_set()


def _nearest_columns(d: np.ndarray, count: int) -> np.ndarray:
    """Column indices of the ``count`` smallest entries of each row (any order): repeated argmin, which for the
    one to three probes used is several times cheaper than a full argpartition. Overwrites ``d``."""
    if count >= d.shape[1]:
        return np.broadcast_to(np.arange(d.shape[1]), d.shape)
    rows = np.arange(len(d))
    out = np.empty((len(d), count), dtype=np.intp)
    for j in range(count):
        out[:, j] = np.argmin(d, axis=1)
        d[rows, out[:, j]] = np.inf
    return out


def _merge_smallest(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Row-wise k smallest of two (Q, ≤k) arrays, ascending (inf pads rows with fewer than k found)."""
    if k == 1:
        return np.minimum(a, b)
    merged = np.concatenate([a, b], axis=1)
    merged.sort(axis=1)
    return merged[:, :k]


@dataclass(frozen=True)
class _Centroids:
    vectors: np.ndarray
    sq_norms: np.ndarray


@dataclass(frozen=True)
class _Partition:
    """The bank reordered cell by cell: cell ``c`` is rows ``start[c]:start[c + 1]`` of ``vectors``."""

    centroids: _Centroids
    vectors: np.ndarray
    sq_norms: np.ndarray
    start: np.ndarray

    @classmethod
    def build(cls, vectors: np.ndarray, sq_norms: np.ndarray, cells: int, *, seed: int) -> _Partition:
        centroids = _kmeans(vectors, cells, seed=seed)
        cell = _nearest_centroid(vectors, centroids)
        order = np.argsort(cell, kind="stable")
        start = np.searchsorted(cell[order], np.arange(cells + 1))
        return cls(centroids, np.ascontiguousarray(vectors[order]), sq_norms[order], start)


def _default_cells(bank_size: int) -> int:
    """About sqrt(M) cells of about sqrt(M) patches: 97 for a 9.4k bank (measured in benchmarks/README.md)."""
    return int(max(8, min(1024, round(bank_size**0.5))))


def _nearest_centroid(x: np.ndarray, centroids: _Centroids, block: int = 16384) -> np.ndarray:
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), block):
        d = centroids.sq_norms[None, :] - 2.0 * (x[i : i + block] @ centroids.vectors.T)
        out[i : i + block] = np.argmin(d, axis=1)
    return out


def _kmeans(x: np.ndarray, cells: int, *, seed: int, iterations: int = 8, sample: int = 16384) -> _Centroids:
    """A few seeded Lloyd iterations on a sample of the bank; quality only affects speed, never the scores."""
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))]
    c = train[rng.choice(len(train), cells, replace=False)].copy()
    for _ in range(iterations):
        assign = _nearest_centroid(train, _Centroids(c, _sq_norms(c)))
        counts = np.bincount(assign, minlength=cells)
        filled = counts > 0  # an empty cell keeps its old centre
        order = np.argsort(assign, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[filled]
        c[filled] = np.add.reduceat(train[order], starts, axis=0) / counts[filled, None]
    return _Centroids(np.ascontiguousarray(c), _sq_norms(c))


def patch_distances(
    embeddings: np.ndarray, references: np.ndarray | GoldenBank, config: ScoringConfig | None = None
) -> np.ndarray:
    """Per-query (image mode, shape (N,)) or per-patch (patch mode, shape (N, P)) distance to the references.

    ``references`` is a 2-D bank (M, D); a 3-D stack of reference patch embeddings (R, P, D) is flattened to one.
    """
    cfg = config or ScoringConfig()
    bank = (
        references if isinstance(references, GoldenBank) else GoldenBank(references, cells=0, chunk_size=cfg.chunk_size)
    )
    return bank.patch_distances(embeddings, cfg)


def anomaly_scores(
    embeddings: np.ndarray,
    references: np.ndarray | GoldenBank,
    config: ScoringConfig | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """One score per image (higher = more anomalous): distance to the golden references, worst patch in patch mode.

    Pass a :class:`GoldenBank` to reuse its preparation across calls (the line does); a plain array is prepared
    on every call. ``valid``: see :meth:`GoldenBank.anomaly_scores`.
    """
    if len(embeddings) == 0:
        return np.zeros((0,), dtype=np.float32)
    cfg = config or ScoringConfig()
    bank = references if isinstance(references, GoldenBank) else GoldenBank(references, chunk_size=cfg.chunk_size)
    return bank.anomaly_scores(embeddings, cfg, valid)


def patch_mask(embeddings: np.ndarray, config: ScoringConfig, valid: np.ndarray | None) -> np.ndarray | None:
    """The patches a score may use, (N, P) bool, or None for all of them (image mode, no mask, or a config that
    scores the padding). A part with no patch on it (a sliver of an image) falls back to all its patches."""
    if valid is None or not config.content_only or np.ndim(embeddings) != 3:
        return None
    mask = np.asarray(valid, dtype=bool)
    if mask.shape != embeddings.shape[:2]:
        raise ValueError(
            f"patch mask of shape {mask.shape} for embeddings of shape {embeddings.shape}: one flag per patch"
        )
    if mask.all():
        return None
    empty = ~mask.any(axis=1)
    if empty.any():
        mask = mask.copy()
        mask[empty] = True
    return mask


def _masked_median(d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row medians (N,) of ``d`` (N, P) over the masked-in entries of each row."""
    return np.array([np.median(row[m]) for row, m in zip(d, mask)], dtype=np.float32)


def offset_scores(worst: np.ndarray, typical: np.ndarray, offset: float) -> np.ndarray:
    """Patch-mode scores from each part's worst and typical patch distance (``GoldenBank.worst_and_typical``)."""
    return (worst - np.float32(offset) * typical).astype(np.float32)


def verdicts(scores: np.ndarray, threshold: float) -> np.ndarray:
    """True where a part is flagged as anomalous (score strictly above the threshold)."""
    return np.asarray(scores) > threshold
