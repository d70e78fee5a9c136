"""The layering rules: the line runtime never pulls in the training stack; models never pull in orchestration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "prefect", "mlflow", "albumentations", "timm")


def _loaded_after(code: str) -> list[str]:
    probe = (
        code
        + f"\nimport sys, json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inspector_scores_without_training_stack(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    code = (
        "import inspector\n"
        f"r = inspector.Inspector.from_bundle({str(tiny_bundle)!r}).score([{str(img)!r}])\n"
        "assert r[0].error is None and r[0].score is not None, r\n"
        "import inspector.cli\n"
    )
    assert _loaded_after(code) == []


def test_registry_service_path_without_training_stack(tiny_bundle: Path, tmp_path: Path) -> None:
    """Serving from the registry (REST client, cache, poller, app) stays on the line runtime: no mlflow client."""
    import pytest

    pytest.importorskip("fastapi")
    code = (
        "import shutil\n"
        "from inspector.registry import BundleCache, RegistryClient, RegistrySource, parse_model_uri\n"
        "from inspector.service import ServiceSettings, create_app, load_initial_model\n"
        f"cache = BundleCache({str(tmp_path / 'cache')!r})\n"
        f"shutil.copytree({str(tiny_bundle)!r}, cache.version_dir('tiny', '4'))\n"
        "cache.remember('models:/tiny@champion', '4')\n"
        "s = ServiceSettings(model_uri='models:/tiny@champion', tracking_uri='http://127.0.0.1:9',\n"
        f"                    cache_dir={str(tmp_path / 'cache')!r}, registry_timeout=1, threads=1)\n"
        "app = create_app(s)\n"
        "model = load_initial_model(app)  # registry down: the cached version, through the whole load path\n"
        "assert model.registry_version == '4' and app.state.watcher.up is False, model\n"
    )
    assert _loaded_after(code) == []


def test_models_do_not_import_orchestration() -> None:
    loaded = _loaded_after("import models.siamese, models.training, models.export, models.losses, models.backbones")
    assert "prefect" not in loaded and "mlflow" not in loaded


def test_dataset_split_without_training_stack() -> None:
    """Reading a layout, validating the images and splitting them needs neither torch nor orchestration."""
    loaded = _loaded_after("import pipelines.data.layouts, pipelines.data.manifest, pipelines.data.split")
    assert loaded == [], f"reading and splitting a dataset pulls in {loaded}"


def test_no_forbidden_import_statements() -> None:
    """Static check too, so a lazy import inside a function cannot hide from the runtime probe."""
    import re

    rule = {"inspector": HEAVY, "models": ("prefect", "mlflow"), "pipelines/data": HEAVY}
    for package, banned in rule.items():
        pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(banned)})\b", re.M)
        for path in (ROOT / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path} imports one of {banned}"


def test_batch_scoring_path_without_torch() -> None:
    """A batch-scoring worker (the `scorer` image, the `cluster` extra) runs the flow and the line's engine with no
    training stack: neither the flow, the worker code, the registry lookup nor the CLI entry imports torch."""
    code = (
        "import pipelines.batch.flow, pipelines.batch.worker, pipelines.line_registry\n"
        "from pipelines.cli import _parser\n"
        "_parser().parse_args(['score-batch', 'x', '--model', 'y', '--out', 'z'])\n"
    )
    assert set(_loaded_after(code)) <= {"prefect", "mlflow"}
