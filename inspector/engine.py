"""The line scorer: a verified bundle, an onnxruntime session and the scoring rule, behind one small API.

``Inspector.from_bundle(path).score(images)`` is what the CLI, the HTTP service and the pipelines' evaluation
call. A bad image fails that item (``ScoreResult.error``), never the batch.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image

from inspector.bundle import Bundle, load_bundle
from inspector.errors import ImageError, InspectorError
from inspector.preprocess import PreprocessConfig, Preprocessor, full_placement, patch_grid
from inspector.scorer import RawScores, Scorer
from inspector.scoring import use_one_blas_thread

ImageSource = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class ScoreResult:
    """The verdict for one image; ``error`` is set (and score is None) when the image could not be read."""

    source: str
    score: float | None
    threshold: float
    anomalous: bool | None
    model_version: str
    error: str | None = None
    #: with a whole-part score: each view's score in the threshold's units ("patch": the worst patch, "part": the
    #: whole part); the score is their mean (or the larger, as the bundle says), so they say whether a flag came
    #: from a local defect or the whole part
    views: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.source,
            "score": self.score,
            "threshold": self.threshold,
            "verdict": None if self.anomalous is None else ("anomalous" if self.anomalous else "good"),
            "model_version": self.model_version,
            "error": self.error,
        }
        if self.views is not None:
            out["views"] = self.views
        return out


PLACEMENT_INPUT = "placement"


class Embedded(NamedTuple):
    """What the model made of the readable images (rows in input order) and a per-image error (or None)."""

    embeddings: np.ndarray
    valid: np.ndarray | None  # (N, P) patches on the part, patch embeddings only
    descriptors: np.ndarray | None  # (N, K) whole-part descriptors, models that output them only
    errors: list[str | None]


class Prepared(NamedTuple):
    """Decoded, preprocessed images: the batch of the readable ones, a per-image error, their original sizes."""

    batch: np.ndarray
    errors: list[str | None]
    sizes: list[tuple[int, int]]


def make_session(
    model_path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    spinning: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation; CUDA first when the runtime has it.

    Spinning is off by default (``spinning=True``; ``INSPECTOR_ORT_SPIN=1`` at the CLI): ORT's idle worker threads
    otherwise busy-wait after every run and take the cores from the decode threads and the kNN that run alongside;
    on 2 cores that cost end-to-end throughput and left the forward pass itself no faster
    (benchmarks/README.md).
    """
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=list(providers))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: ``Inspector.score`` streams a call of more images than this through ``score_paths`` (a chunk at a time in memory).
SCORE_CHUNK = 256

#: The most single-threaded forward passes run side by side (each holds its own activations).
MAX_STREAMS = 8


def default_streams(threads: int | None, providers: Sequence[str]) -> int:
    """How many batches the CPU scores side by side, each on one core (1: one batch at a time on all cores).

    Why: on the CPU one forward pass split over all cores waits at every layer for its slowest thread, and the
    decode and golden-bank search that share the cores make some thread the slowest at every layer. Whole batches
    run side by side, one core each, never wait for each other, and the scheduler slots the decode and search into
    the gaps (end to end ×1.40 → ×1.22 the forward alone on 2 cores; benchmarks/README.md).
    A GPU session runs one batch at a time.
    """
    if "CUDAExecutionProvider" in providers:
        return 1
    return max(1, min(MAX_STREAMS, threads if threads else _usable_cores()))


def _source_name(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<image {index}>"


def _default_decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class OnnxEmbedder:
    """Decode, preprocess and embed images with an ONNX embedder: the line's (and evaluation's) only path.

    Decoding and resizing run on a small thread pool (Pillow releases the GIL for both), and the batch is
    normalised once as uint8 → float32 NCHW instead of per image.
    """

    def __init__(
        self,
        model_path: str | Path,
        preprocessing: PreprocessConfig,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
        decode_workers: int | None = None,
        streams: int | None = None,
        spinning: bool = False,
    ) -> None:
        self.preprocessing = preprocessing
        self.preprocessor = Preprocessor(preprocessing)
        self.model_path = Path(model_path)
        self.session = make_session(model_path, threads=threads, providers=providers, spinning=spinning)
        #: batches :meth:`Inspector.score_paths` scores side by side, each on one core (see :func:`default_streams`)
        self.streams = (
            max(1, streams) if streams is not None else default_streams(threads, self.session.get_providers())
        )
        self._serial: ort.InferenceSession | None = None
        self._serial_lock = threading.Lock()
        self.input_name = self.session.get_inputs()[0].name
        #: the model also takes each part's placement and outputs its whole-part descriptor (inspector.density)
        self.describes_parts = any(i.name == PLACEMENT_INPUT for i in self.session.get_inputs())
        out_dim = self.session.get_outputs()[0].shape[-1]
        self.embedding_dim: int | None = out_dim if isinstance(out_dim, int) else None
        self.batch_size = batch_size
        self.decode_workers = decode_workers if decode_workers is not None else _default_decode_workers()
        self._pool = (
            ThreadPoolExecutor(self.decode_workers, thread_name_prefix="inspector-decode")
            if self.decode_workers > 1
            else None
        )

    def placements(self, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(N, 4) where each image of original (width, height) sits on the input: left, top, width, height."""
        return self.preprocessor.placements(sizes)

    def serial_session(self) -> ort.InferenceSession:
        """A session of the same model on one intra-op thread, for batches run side by side (made on first use:
        a process that scores one batch at a time never pays for it)."""
        with self._serial_lock:
            if self._serial is None:
                self._serial = make_session(self.model_path, threads=1, providers=self.session.get_providers())
            return self._serial

    def run(
        self, batch: np.ndarray, sizes: Sequence[tuple[int, int]] | None = None, *, serial: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings of a preprocessed batch and, for a model that describes whole parts, their descriptors (else
        None). ``sizes``: the images' original (width, height), which place each part on the input (without them,
        each part is taken to fill the input). ``serial``: on one core (:meth:`serial_session`), for callers that
        run several batches side by side."""
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim or 0), dtype=np.float32), None
        cfg = self.preprocessing
        place = None
        if self.describes_parts:
            if sizes is not None and len(sizes) != len(batch):
                raise ValueError(f"{len(sizes)} image sizes for a batch of {len(batch)}")
            place = self.placements(sizes) if sizes is not None else full_placement(len(batch), cfg.height, cfg.width)
        session = self.serial_session() if serial else self.session
        embeddings, descriptors = [], []
        for i in range(0, len(batch), self.batch_size):
            feed = {self.input_name: np.ascontiguousarray(batch[i : i + self.batch_size], dtype=np.float32)}
            if place is not None:
                feed[PLACEMENT_INPUT] = place[i : i + self.batch_size]
            outs = session.run(None, feed)
            embeddings.append(outs[0])
            if place is not None:
                descriptors.append(outs[1])
        emb = np.concatenate(embeddings).astype(np.float32, copy=False)
        return emb, (np.concatenate(descriptors).astype(np.float32, copy=False) if descriptors else None)

    def _decode(self, source: ImageSource, name: str) -> Image.Image:
        if isinstance(source, Image.Image):
            return source if source.mode in ("RGB", "L") else source.convert("RGB")
        return self.preprocessor.load(source, name=name, keep_gray=True)

    def _resized(self, item: tuple[int, ImageSource]) -> tuple[np.ndarray, tuple[int, int]] | str:
        """One image decoded and resized to HxWx3 uint8 with its original (width, height), or its error message."""
        i, source = item
        try:
            image = self._decode(source, _source_name(source, i))
            return self.preprocessor.resize(image), image.size
        except ImageError as exc:
            return str(exc)

    def prepare(self, images: Sequence[ImageSource], *, pooled: bool = True, start: int = 0) -> Prepared:
        """Decode and preprocess: a float32 NCHW batch of the readable images (input order), a per-image error, and
        each readable image's original size (for :meth:`patch_valid`). ``pooled=False`` decodes in the calling
        thread (for callers that already run batches side by side); ``start``: the first image's index in the
        caller's list (it names in-memory images in errors)."""
        items = list(enumerate(images, start))
        if pooled and self._pool is not None and len(items) > 1:
            done = list(self._pool.map(self._resized, items))
        else:
            done = [self._resized(item) for item in items]
        errors = [d if isinstance(d, str) else None for d in done]
        ok = [d for d in done if not isinstance(d, str)]
        cfg = self.preprocessing
        if not ok:
            return Prepared(np.zeros((0, 3, cfg.height, cfg.width), dtype=np.float32), errors, [])
        return Prepared(self.preprocessor.normalize(np.stack([a for a, _ in ok])), errors, [size for _, size in ok])

    def patch_valid(self, sizes: Sequence[tuple[int, int]], embeddings: np.ndarray) -> np.ndarray | None:
        """(N, P) True for the patches on each part (not its letterbox padding); None for image embeddings."""
        if np.ndim(embeddings) != 3:
            return None
        cfg = self.preprocessing
        return self.preprocessor.content_mask(list(sizes), patch_grid(int(embeddings.shape[1]), cfg.height, cfg.width))

    def embed(self, images: Sequence[ImageSource]) -> Embedded:
        """What the model makes of the readable images (rows in input order): embeddings, the patches on each part,
        whole-part descriptors (models that output them), and a per-image error (or None)."""
        batch, errors, sizes = self.prepare(images)
        if not len(batch):
            return Embedded(np.zeros((0, self.embedding_dim or 0), dtype=np.float32), None, None, errors)
        embeddings, descriptors = self.run(batch, sizes)
        return Embedded(embeddings, self.patch_valid(sizes, embeddings), descriptors, errors)

    def close(self) -> None:
        """Stop the decode threads (they also stop with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class Inspector:
    """Scores part images against the golden references of one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
        decode_workers: int | None = None,
        streams: int | None = None,
        spinning: bool = False,
    ) -> None:
        self.bundle = bundle
        self.embedder = OnnxEmbedder(
            bundle.model_path,
            bundle.spec.preprocessing,
            threads=threads,
            providers=providers,
            batch_size=batch_size,
            decode_workers=decode_workers,
            streams=streams,
            spinning=spinning,
        )
        dim = self.embedder.embedding_dim
        if dim is not None and dim != bundle.references.shape[1]:
            raise InspectorError(
                f"{bundle.path}: model outputs {dim}-d embeddings but references are {bundle.references.shape[1]}-d"
            )
        if bundle.spec.density is not None and not self.embedder.describes_parts:
            raise InspectorError(
                f"{bundle.path}: the bundle scores whole parts but its model has no '{PLACEMENT_INPUT}' input"
            )
        #: the one composition from embeddings to verdicts (inspector.scorer)
        self.scorer = Scorer.from_bundle(bundle)
        if self.scorer.bank.cells > 1:
            use_one_blas_thread()  # from the loading (usually main) thread: see its docstring
            self.scorer.bank.partition()  # at load, not on the first part of the line

    @classmethod
    def from_bundle(cls, path: str | Path, **kwargs: Any) -> Inspector:
        return cls(load_bundle(path), **kwargs)

    @property
    def threshold(self) -> float:
        return self.bundle.spec.threshold.value

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def embed(self, images: Sequence[ImageSource]) -> Embedded:
        return self.embedder.embed(images)

    def score_embeddings(
        self, embeddings: np.ndarray, valid: np.ndarray | None = None, descriptors: np.ndarray | None = None
    ) -> np.ndarray:
        """The line's scores of embeddings already computed (:meth:`OnnxEmbedder.embed` gives all three inputs)."""
        return self.scorer.score(embeddings, valid, descriptors)

    @property
    def patch_threshold(self) -> float:
        """The threshold in the patch view's units, which heatmaps are drawn against (``Scorer.patch_threshold``)."""
        return self.scorer.patch_threshold

    def score(self, images: Sequence[ImageSource] | ImageSource) -> list[ScoreResult]:
        """Score one or many images; unreadable ones get a result with ``error`` set instead of failing the batch."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            images = [images]
        images = list(images)
        if len(images) > SCORE_CHUNK:  # a whole folder in one call: streamed, so memory stays bounded
            return list(self.score_paths(images, SCORE_CHUNK))
        return self._results(images, self.embedder.prepare(images))

    def _results(self, images: list[ImageSource], prepared: Prepared) -> list[ScoreResult]:
        """Embed and score a prepared batch; one result per input image, in order."""
        return self._scored(images, prepared, self._forward(prepared))

    def _forward(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The model's outputs (embeddings, descriptors) for a prepared batch; None when nothing in it was readable."""
        return self.embedder.run(prepared.batch, prepared.sizes) if len(prepared.batch) else None

    def _scored(
        self,
        images: list[ImageSource],
        prepared: Prepared,
        outputs: tuple[np.ndarray, np.ndarray | None] | None,
        start: int = 0,
    ) -> list[ScoreResult]:
        """Verdicts from the model's outputs: the golden-bank search, the whole-part view, one result per image."""
        if outputs is None:
            return self.results_for(images, None, prepared.errors, start=start)
        embeddings, descriptors = outputs
        raw = self.scorer.raw(embeddings, self.embedder.patch_valid(prepared.sizes, embeddings), descriptors)
        return self.results_for(images, raw, prepared.errors, start=start)

    def _scored_alone(self, images: list[ImageSource], start: int = 0) -> list[ScoreResult]:
        """One batch from decode to verdicts in the calling thread, its forward pass on one core (batches run
        side by side)."""
        prepared = self.embedder.prepare(images, pooled=False, start=start)
        outputs = self.embedder.run(prepared.batch, prepared.sizes, serial=True) if len(prepared.batch) else None
        return self._scored(images, prepared, outputs, start)

    def _side_by_side(self, images: Iterable[ImageSource], size: int) -> Iterator[ScoreResult]:
        """Results in input order of batches of ``size`` scored side by side, ``embedder.streams`` at a time, each
        from decode to verdict on one core; at most two batches a stream are in memory."""
        streams = self.embedder.streams
        pending: deque[Future[list[ScoreResult]]] = deque()
        with ThreadPoolExecutor(streams, thread_name_prefix="inspector-stream") as pool:
            try:
                start = 0
                for batch in _chunks(images, size):
                    pending.append(pool.submit(self._scored_alone, batch, start))
                    start += len(batch)
                    if len(pending) > 2 * streams:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:  # a consumer that stops early leaves no queued work behind
                for future in pending:
                    future.cancel()

    def results_for(
        self, images: Sequence[ImageSource], raw: RawScores | None, errors: list[str | None], *, start: int = 0
    ) -> list[ScoreResult]:
        """Verdicts for ``images`` from the raw view scores of the readable ones (in order; None when none was
        readable) and a per-image error (or None); ``start``: the first image's index in the caller's list (it names
        in-memory images)."""
        scores: Iterator[float] = iter(())
        per_view: Iterator[dict[str, float]] = iter(())
        if raw is not None and len(raw):
            scores = iter(self.scorer.fuse(raw).tolist())
            views = self.scorer.standardised(raw)
            if views is not None:
                per_view = iter([{k: float(v[i]) for k, v in views.items()} for i in range(len(raw))])
        results = []
        for i, (source, error) in enumerate(zip(images, errors), start):
            name = _source_name(source, i)
            if error is not None:
                results.append(ScoreResult(name, None, self.threshold, None, self.model_version, error))
                continue
            s = float(next(scores))
            results.append(
                ScoreResult(name, s, self.threshold, s > self.threshold, self.model_version, views=next(per_view, None))
            )
        return results

    def score_paths(self, paths: Iterable[ImageSource], chunk: int = SCORE_CHUNK) -> Iterator[ScoreResult]:
        """Stream results for a long list of files (or in-memory images), ``chunk`` at a time to bound memory.

        On a CPU with several cores (``embedder.streams`` > 1, :func:`default_streams`) batches of at most
        ``batch_size`` images are scored side by side, each from decode to verdict on one core. Otherwise (one
        core, a GPU) it is pipelined in three stages, so that no stage waits for the others on a machine with cores
        to spare: while onnxruntime runs on one chunk (in the calling thread), a background thread decodes and
        preprocesses the next and another searches the golden bank for the previous one (at most three chunks in
        memory). Results come out in input order, the same as :meth:`score` gives.
        """
        if self.embedder.streams > 1:
            yield from self._side_by_side(paths, max(1, min(chunk, self.embedder.batch_size)))
            return
        with (
            ThreadPoolExecutor(1, thread_name_prefix="inspector-prefetch") as prefetch,
            ThreadPoolExecutor(1, thread_name_prefix="inspector-search") as search,
        ):
            prepared: Future[Prepared] | None = None
            prepared_images: list[ImageSource] = []
            scored: Future[list[ScoreResult]] | None = None
            start = 0
            for images in _chunks(paths, chunk):
                upcoming = prefetch.submit(self.embedder.prepare, images, start=start)
                if prepared is not None:
                    scored = yield from self._pipeline_step(
                        search, scored, prepared_images, prepared.result(), start - len(prepared_images)
                    )
                prepared, prepared_images = upcoming, images
                start += len(images)
            if prepared is not None:
                scored = yield from self._pipeline_step(
                    search, scored, prepared_images, prepared.result(), start - len(prepared_images)
                )
            if scored is not None:
                yield from scored.result()

    def _pipeline_step(
        self,
        search: ThreadPoolExecutor,
        previous: Future[list[ScoreResult]] | None,
        images: list[ImageSource],
        prepared: Prepared,
        start: int,
    ) -> Generator[ScoreResult, None, Future[list[ScoreResult]]]:
        """Run the model on this chunk, then hand out the previous chunk's results and queue this chunk's search."""
        outputs = self._forward(prepared)
        if previous is not None:
            yield from previous.result()
        return search.submit(self._scored, images, prepared, outputs, start)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
