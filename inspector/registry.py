"""Fetch a bundle from an MLflow model registry with the standard library only: the line PC has no mlflow.

```
models:/<name>@<alias>   -> GET /api/2.0/mlflow/registered-models/alias           -> version
models:/<name>/<version> -> GET /api/2.0/mlflow/model-versions/get                -> version (exists?)
version                  -> GET /api/2.0/mlflow/model-versions/get-download-uri   -> artifact URI of the logged model
artifact URI             -> MLmodel (python_function artifacts: where the bundle sits) -> every bundle file
```

Artifacts are read through the tracking server's proxy (``mlflow-artifacts:/…``, the default of ``mlflow server``:
``/api/2.0/mlflow-artifacts/artifacts``) or straight from a ``file:`` location this host can read. Anything else
(s3, gcs…) is refused with a message saying to run the server with ``--serve-artifacts``.

A downloaded bundle is verified (:func:`~inspector.bundle.load_bundle`: schema and sha256 of every file, plus the
hashes the registry recorded as version tags, :func:`~inspector.registry_contract.check_bundle_matches_tags`) in a
temp dir, then renamed into ``<cache>/<name>/<version>``, so the
cache only ever holds whole, verified versions; a cached version is reused without a download. The cache also
remembers which version an alias pointed to when it was last served, so a restart with the registry down can
serve that version.

Errors: :class:`RegistryUnreachable` (network, timeout, 5xx: worth retrying, the service keeps its model) and
:class:`RegistryError` (unknown model or alias, not an inspector model, auth); a hash mismatch is a
:class:`~inspector.errors.BundleError`. Each names the model URI and the problem.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from inspector.bundle import MANIFEST, Bundle, load_bundle
from inspector.durable import replace_durably
from inspector.errors import BundleError, InspectorError
from inspector.registry_contract import BUNDLE_ARTIFACT, SIGNATURE_TAG, check_bundle_matches_tags, slug
from inspector.signing import SIGNATURE_FILE, write_signature

API = "/api/2.0/mlflow"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
MAX_BUNDLE_FILES = 64
_ALIASES_DIR = "_aliases"


class RegistryError(InspectorError):
    """The registry answered, but the model cannot be served from it (unknown model/alias, not an inspector model)."""


class RegistryUnreachable(RegistryError):
    """The registry could not be asked (connection refused, timeout, 5xx): transient, keep serving and retry."""


# ------------------------------------------------------------------------------------------------ model URIs


@dataclass(frozen=True)
class ModelUri:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


_URI = re.compile(r"^models:/(?P<name>[^/@]+?)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> ModelUri:
    """Parse a registry URI; anything else (``runs:/``, ``latest``, stages, a path) is an error that says what works."""
    match = _URI.match(uri.strip())
    if not match:
        raise RegistryError(
            f"{uri!r}: not a registry model URI; use models:/<name>@<alias> (e.g. models:/parts@champion) "
            "or models:/<name>/<version number>"
        )
    return ModelUri(name=match["name"], alias=match["alias"], version=match["version"])


# ---------------------------------------------------------------------------------------------- MLmodel YAML


_YAML_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?:\s+(?P<value>.*?))?\s*$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def mlmodel_scalars(text: str) -> dict[tuple[str, ...], str]:
    """The ``key: value`` scalars of an MLmodel file (block-style YAML as MLflow writes it), by key path.

    Deliberately minimal (no PyYAML on the line PC): nested block mappings of plain keys; list items, flow
    collections and continuation lines of long strings are skipped, which is all we need to find the bundle.
    """
    scalars: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = _YAML_KEY.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), match["key"])
        value = match["value"]
        if value:
            scalars[path] = _unquote(value)
        else:
            stack.append((indent, match["key"]))
    return scalars


def bundle_path_in_mlmodel(text: str, uri: str) -> str:
    """Where the bundle directory sits inside the model's artifacts (``artifacts/bundle``), from MLmodel."""
    scalars = mlmodel_scalars(text)
    path = scalars.get(("flavors", "python_function", "artifacts", BUNDLE_ARTIFACT, "path"))
    if not path:
        raise RegistryError(
            f"{uri}: not an inspector model (its MLmodel has no python_function artifact {BUNDLE_ARTIFACT!r})"
        )
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise RegistryError(f"{uri}: MLmodel names an invalid bundle path {path!r}")
    return "/".join(parts)


# ------------------------------------------------------------------------------------------------ REST client


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered version, as the registry describes it."""

    uri: str  # what was asked for (models:/name@alias)
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)


def _auth_header(env: Mapping[str, str]) -> str | None:
    token = env.get("MLFLOW_TRACKING_TOKEN", "").strip()
    if token:
        return f"Bearer {token}"
    user, password = env.get("MLFLOW_TRACKING_USERNAME", ""), env.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


class RegistryClient:
    """MLflow's REST API over urllib: resolve a model URI, list and download its artifacts. Every call times out."""

    def __init__(self, tracking_uri: str, *, timeout: float = 10.0, env: Mapping[str, str] | None = None) -> None:
        parsed = urllib.parse.urlsplit(tracking_uri.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RegistryError(
                f"tracking URI {tracking_uri!r}: the line service talks to an MLflow server over "
                "http(s) (e.g. http://mlflow.plant.local:5000); a local sqlite/file store needs mlflow"
            )
        self.base = tracking_uri.strip().rstrip("/")
        self.timeout = timeout
        self._auth = _auth_header(os.environ if env is None else env)

    # -- transport

    def open_url(self, url: str, what: str) -> Any:
        request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "inspector"})
        if self._auth:
            request.add_header("Authorization", self._auth)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            body = exc.read(4096).decode("utf-8", "replace")
            exc.close()
            if exc.code >= 500 or exc.code == 429:
                raise RegistryUnreachable(f"{what}: registry {self.base} answered HTTP {exc.code}") from None
            raise _http_error(exc.code, body, what, self.base) from None
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryUnreachable(f"{what}: registry {self.base} unreachable ({reason})") from None

    def read_json(self, url: str, what: str) -> dict[str, Any]:
        with self.open_url(url, what) as response:
            raw = response.read()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):  # a proxy's error page, a truncated answer: transient
            raise RegistryUnreachable(f"{what}: {url.split('?', 1)[0]} did not answer with a JSON object")
        return body

    def get_json(self, endpoint: str, params: Mapping[str, str], what: str) -> dict[str, Any]:
        return self.read_json(f"{self.base}{endpoint}?{urllib.parse.urlencode(params)}", what)

    # -- the registry

    def resolve(self, uri: str | ModelUri) -> ModelVersionRef:
        """The version an alias points to now (or check that a pinned version exists), with its tags."""
        model = uri if isinstance(uri, ModelUri) else parse_model_uri(uri)
        if model.alias:
            body = self.get_json(
                f"{API}/registered-models/alias", {"name": model.name, "alias": model.alias}, str(model)
            )
        else:
            body = self.get_json(
                f"{API}/model-versions/get", {"name": model.name, "version": str(model.version)}, str(model)
            )
        mv = body.get("model_version") or {}
        if "version" not in mv:
            raise RegistryError(f"{model}: the registry's answer holds no model version")
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", []) if "key" in t}
        return ModelVersionRef(uri=str(model), name=model.name, version=str(mv["version"]), tags=tags)

    def download_uri(self, ref: ModelVersionRef) -> str:
        body = self.get_json(
            f"{API}/model-versions/get-download-uri",
            {"name": ref.name, "version": ref.version},
            f"{ref.uri} (version {ref.version})",
        )
        uri = body.get("artifact_uri")
        if not uri:
            raise RegistryError(f"{ref.uri} (version {ref.version}): the registry gave no artifact location")
        return str(uri)

    def artifacts(self, artifact_uri: str, what: str) -> ArtifactStore:
        """The store for an artifact URI: proxied through this server, or a local directory."""
        parsed = urllib.parse.urlsplit(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":
            base = f"{urllib.parse.urlsplit(self.base).scheme}://{parsed.netloc}" if parsed.netloc else self.base
            return ProxiedArtifacts(self, base, parsed.path.strip("/"), what)
        if parsed.scheme in ("http", "https") and ARTIFACTS_API in parsed.path:
            prefix, _, rest = parsed.path.partition(ARTIFACTS_API)
            return ProxiedArtifacts(self, f"{parsed.scheme}://{parsed.netloc}{prefix}", rest.strip("/"), what)
        return local_artifacts(artifact_uri, what)


def local_artifacts(artifact_uri: str, what: str) -> LocalArtifacts:
    """A ``file:`` (or absolute path) artifact location this host reads straight from disk; any other is refused."""
    parsed = urllib.parse.urlsplit(artifact_uri)
    if parsed.scheme == "file" or (not parsed.scheme and artifact_uri.startswith("/")):
        root = Path(urllib.parse.unquote(parsed.path))
        if not root.is_dir():
            raise RegistryError(
                f"{what}: artifact location {artifact_uri} is not a directory readable from this host "
                "(serve artifacts through the tracking server: mlflow server --artifacts-destination …)"
            )
        return LocalArtifacts(root)
    raise RegistryError(
        f"{what}: artifact location {artifact_uri!r} ({parsed.scheme or 'no scheme'}) is not readable "
        "without mlflow; run the tracking server with proxied artifacts (--serve-artifacts, "
        "--artifacts-destination …) so the line reads them over HTTP"
    )


def _http_error(code: int, body: str, what: str, base: str) -> RegistryError:
    try:
        payload = json.loads(body)
        message, error_code = str(payload.get("message", "")), str(payload.get("error_code", ""))
    except (json.JSONDecodeError, AttributeError):
        message, error_code = body.strip()[:200], ""
    if code in (401, 403):
        return RegistryError(
            f"{what}: registry {base} refused access (HTTP {code}); set MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        )
    if "alias" in message.lower() and "not found" in message.lower():
        return RegistryError(f"{what}: unknown alias ({message})")
    if error_code == "RESOURCE_DOES_NOT_EXIST" or code == 404:
        return RegistryError(f"{what}: not found in the registry ({message or f'HTTP {code}'})")
    return RegistryError(f"{what}: registry {base} answered HTTP {code} ({message or error_code or 'no detail'})")


class ArtifactStore:
    """Read-only access to one logged model's artifacts: list a directory, open a file."""

    def list(self, path: str) -> list[tuple[str, bool, int | None]]:
        """(name relative to ``path``, is_dir, size or None) for each entry of ``path``."""
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def read_text(self, path: str, limit: int = 1 << 20) -> str:
        with self.open(path) as fh:
            return fh.read(limit).decode("utf-8", "replace")


class ProxiedArtifacts(ArtifactStore):
    """``/api/2.0/mlflow-artifacts/artifacts``: the tracking server streams files from its artifact destination."""

    def __init__(self, client: RegistryClient, base: str, root: str, what: str) -> None:
        self.client, self.base, self.root, self.what = client, base.rstrip("/"), root, what

    def _full(self, path: str) -> str:
        return "/".join(p for p in (self.root, path.strip("/")) if p)

    def list(self, path: str) -> list[tuple[str, bool, int | None]]:
        body = self.client.read_json(
            f"{self.base}{ARTIFACTS_API}?{urllib.parse.urlencode({'path': self._full(path)})}", self.what
        )
        out = []
        for entry in body.get("files", []):
            name = str(entry.get("path", "")).rsplit("/", 1)[-1]
            size = entry.get("file_size")
            out.append((name, bool(entry.get("is_dir")), int(size) if size is not None else None))
        return out

    def open(self, path: str) -> BinaryIO:
        url = f"{self.base}{ARTIFACTS_API}/{urllib.parse.quote(self._full(path))}"
        return self.client.open_url(url, f"{self.what}: {path}")


class LocalArtifacts(ArtifactStore):
    """A ``file:`` artifact location on a disk this host mounts."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self, path: str) -> list[tuple[str, bool, int | None]]:
        folder = self.root / path
        if not folder.is_dir():
            return []
        return [(p.name, p.is_dir(), None if p.is_dir() else p.stat().st_size) for p in sorted(folder.iterdir())]

    def open(self, path: str) -> BinaryIO:
        try:
            return open(self.root / path, "rb")
        except OSError as exc:
            raise RegistryError(f"{self.root / path}: cannot read artifact ({exc.strerror})") from None


class RegistryReader(Protocol):
    """What the cache needs from a registry: resolve a URI to a version with its tags, find where that version's
    artifacts are, and read them. :class:`RegistryClient` is the line's; a training host with a local store (no
    REST API) passes its own lookup, and downloads, verification and cache stay the line's."""

    def resolve(self, uri: str | ModelUri) -> ModelVersionRef: ...

    def download_uri(self, ref: ModelVersionRef) -> str: ...

    def artifacts(self, artifact_uri: str, what: str) -> ArtifactStore: ...


# ------------------------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class FetchedBundle:
    """A verified bundle of one registered version, on local disk."""

    uri: str
    name: str
    version: str
    path: Path
    downloaded: bool  # False: served from the cache without a download


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/inspector/registry`` (``~/.cache/…``); systemd units point it at ``/var/cache/inspector``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inspector" / "registry"


def _check_tags(bundle: Bundle, ref: ModelVersionRef) -> None:
    check_bundle_matches_tags(bundle, ref.tags, f"{ref.uri} (version {ref.version})")


def _apply_signature(folder: Path, ref: ModelVersionRef) -> None:
    """The gate's signature (a version tag) as the bundle's ``signature.json``; checked where a line requires it."""
    signature = ref.tags.get(SIGNATURE_TAG)
    existing = folder / SIGNATURE_FILE
    if signature and not (existing.is_file() and existing.read_text() == signature):  # a cache hit rewrites nothing
        write_signature(folder, signature)


class BundleCache:
    """``<root>/<name>/<version>/`` holds whole, verified bundles; ``<root>/<name>/_aliases/<alias>`` the last
    version served for an alias. Writes are temp-dir-then-rename, so a crash never leaves half a version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / slug(name) / slug(version)

    def cached(self, name: str, version: str) -> Bundle | None:
        """The cached version, verified again (hashes), or None; a cached copy that fails verification is dropped."""
        path = self.version_dir(name, version)
        if not (path / MANIFEST).is_file():
            return None
        try:
            return load_bundle(path)
        except BundleError:
            shutil.rmtree(path, ignore_errors=True)
            return None

    def remember(self, uri: str, version: str) -> None:
        model = parse_model_uri(uri)
        if not model.alias:
            return
        folder = self.root / slug(model.name) / _ALIASES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"uri": uri, "version": version, "served_at": time.time()})
        fd, tmp = tempfile.mkstemp(prefix=".alias-", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        replace_durably(tmp, folder / slug(model.alias))

    def remembered(self, uri: str) -> str | None:
        """The version last served for ``uri`` (alias URIs), or the pinned version of ``models:/name/N``."""
        model = parse_model_uri(uri)
        if model.version:
            return model.version
        try:
            return str(
                json.loads((self.root / slug(model.name) / _ALIASES_DIR / slug(str(model.alias))).read_text())[
                    "version"
                ]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def fetch(self, client: RegistryReader, ref: ModelVersionRef) -> FetchedBundle:
        """The verified bundle of ``ref``: from the cache, or downloaded, verified, then renamed into the cache."""
        hit = self.cached(ref.name, ref.version)
        if hit is not None:
            try:
                _check_tags(hit, ref)
                _apply_signature(hit.path, ref)  # the gate may have signed it since it was cached
                return FetchedBundle(ref.uri, ref.name, ref.version, hit.path, downloaded=False)
            except BundleError:  # the registry now holds another bundle under this number (store rebuilt): refetch
                shutil.rmtree(hit.path, ignore_errors=True)
        final = self.version_dir(ref.name, ref.version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            what = f"{ref.uri} (version {ref.version})"
            store = client.artifacts(client.download_uri(ref), what)
            bundle_dir = bundle_path_in_mlmodel(store.read_text("MLmodel"), what)
            _download_tree(store, bundle_dir, tmp, what)
            try:
                bundle = load_bundle(tmp)
            except BundleError as exc:
                raise BundleError(f"{what}: downloaded bundle refused: {exc}") from None
            _check_tags(bundle, ref)
            _apply_signature(tmp, ref)
            try:
                replace_durably(tmp, final)
            except OSError:  # another process cached it meanwhile: keep theirs
                if self.cached(ref.name, ref.version) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FetchedBundle(ref.uri, ref.name, ref.version, final, downloaded=True)


def _walk(store: ArtifactStore, path: str, depth: int = 0) -> Iterator[tuple[str, int | None]]:
    for name, is_dir, size in store.list(path):
        child = f"{path}/{name}"
        if name in ("", ".", "..") or "/" in name:
            continue
        if is_dir:
            if depth < 4:
                yield from _walk(store, child, depth + 1)
        else:
            yield child, size


def _download_tree(store: ArtifactStore, root: str, dst: Path, what: str) -> None:
    files = list(_walk(store, root))
    if not files:
        raise RegistryError(f"{what}: the bundle artifact {root!r} is empty or missing")
    if len(files) > MAX_BUNDLE_FILES:
        raise RegistryError(
            f"{what}: the bundle artifact holds {len(files)} files (at most {MAX_BUNDLE_FILES}): "
            "not an inspector bundle"
        )
    for path, size in files:
        target = dst / path[len(root) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        with store.open(path) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)  # flushed to disk with the tree when it is renamed into the cache
        if size is not None and target.stat().st_size != size:
            raise RegistryUnreachable(
                f"{what}: {path} arrived with {target.stat().st_size} of {size} bytes (transfer cut)"
            )


@dataclass(frozen=True)
class RegistrySource:
    """Where registry models come from on this host: a REST client and the local cache of verified versions."""

    client: RegistryReader
    cache: BundleCache

    def fetch(self, uri: str, ref: ModelVersionRef | None = None) -> FetchedBundle:
        """The verified bundle ``uri`` points to now (or of the already resolved ``ref``): cached or downloaded."""
        return self.cache.fetch(self.client, ref or self.client.resolve(uri))

    def cached_for(self, uri: str) -> FetchedBundle | None:
        """The version last served for ``uri``, when the cache still holds it verified: the fallback when the
        registry cannot be asked at startup. Never a version that was not served (or pinned) before."""
        version = self.cache.remembered(uri)
        if version is None:
            return None
        model = parse_model_uri(uri)
        bundle = self.cache.cached(model.name, version)
        return None if bundle is None else FetchedBundle(uri, model.name, version, bundle.path, downloaded=False)
