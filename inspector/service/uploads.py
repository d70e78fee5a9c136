"""The images of one scoring request: read from the body, decoded, scored, one result each and in order.

Why: the reliability rules say a bad image fails that item, never the request, and nothing turns bad input into
a 500. Reading (multipart field ``files`` or one raw ``image/*`` body, at most ``max_images``) answers the
request's own mistakes with a 4xx; scoring gives every upload an :class:`~inspector.service.schemas.ImageScore`,
with an error naming the image where it could not be decoded or scored.
"""

from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from inspector.engine import ScoreResult
from inspector.errors import ImageError
from inspector.service.batching import RequestBatcher
from inspector.service.holder import LoadedModel
from inspector.service.schemas import ImageScore, error_response
from inspector.service.settings import ServiceSettings


@dataclass
class Upload:
    """One image as sent: its name, its bytes, or why it is not an image upload."""

    name: str
    data: bytes | None
    error: str | None = None


async def read_uploads(request: Request, settings: ServiceSettings) -> list[Upload] | JSONResponse:
    """The images of a request: multipart field ``files`` (one or many), or one raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [Upload(name=request.query_params.get("name") or "<body>", data=await request.body())]
    if content_type != "multipart/form-data":
        return error_response(415, "send images as multipart/form-data (field 'files') or one raw image/* body")
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images + 16)
    except StarletteHTTPException as exc:
        status = 413 if "too many files" in str(exc.detail).lower() else 400
        detail = (
            f"{exc.detail} (at most {settings.max_images} images per request)"
            if status == 413
            else f"malformed multipart body: {exc.detail}"
        )
        return error_response(status, detail)
    part = form.get("part")  # the part type, for a service of several (the route chooses it)
    request.state.part = part if isinstance(part, str) else None
    uploads: list[Upload] = []
    try:
        for i, item in enumerate(form.getlist("files")):
            if isinstance(item, UploadFile):
                uploads.append(Upload(name=item.filename or f"<file {i}>", data=await item.read()))
            else:
                name = f"<field {i}>"
                uploads.append(
                    Upload(name=name, data=None, error=f"{name}: not a file upload (send the image as a file)")
                )
    finally:
        await form.close()
    if not uploads:
        return error_response(422, "no images: send one or more files in the multipart field 'files'")
    if len(uploads) > settings.max_images:
        return error_response(413, f"{len(uploads)} images is over the limit of {settings.max_images} per request")
    return uploads


def score_uploads(model: LoadedModel, uploads: list[Upload], batcher: RequestBatcher) -> list[ImageScore]:
    """Decode and score (synchronous: runs in the threadpool), with other requests' images when they queue up
    together (``batcher``). Every upload gets a result, in order."""
    inspector = model.inspector
    threshold = inspector.threshold
    results: list[ImageScore | None] = [None] * len(uploads)
    decoded: list[tuple[int, Image.Image]] = []
    for i, up in enumerate(uploads):
        if up.error is None:
            try:
                decoded.append((i, inspector.embedder.preprocessor.load(up.data or b"", name=up.name, keep_gray=True)))
                continue
            except ImageError as exc:
                up.error = str(exc)
        results[i] = ImageScore(name=up.name, score=None, threshold=threshold, verdict=None, error=up.error)

    def failed(index: int, reason: str) -> ImageScore:
        name = uploads[index].name
        return ImageScore(name=name, score=None, threshold=threshold, verdict=None, error=f"{name}: {reason}")

    def fill(index: int, r: ScoreResult) -> None:
        if r.error is not None or r.score is None:
            results[index] = failed(index, (r.error or "no score").split(": ", 1)[-1])
        else:
            results[index] = ImageScore(
                name=uploads[index].name,
                score=r.score,
                threshold=threshold,
                verdict="anomalous" if r.anomalous else "good",
                views=r.views,
            )

    if decoded:
        try:
            for (i, _), r in zip(decoded, batcher.score(inspector, [img for _, img in decoded])):
                fill(i, r)
        except Exception:  # one odd image must not sink the others: score them one by one to find it
            for i, img in decoded:
                try:
                    fill(i, inspector.score([img])[0])
                except Exception as exc:
                    results[i] = failed(i, f"cannot score image ({type(exc).__name__}: {exc})")
    return [r for r in results if r is not None]
