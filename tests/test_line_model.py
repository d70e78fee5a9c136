"""Which model the line runs: INT8 only where it holds FP32's ranking and verdicts within the recipe's tolerances."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipelines.evaluation import Evaluation
from pipelines.line_model import auroc_loss_interval, choose_line_model, line_metrics, verdict_flips
from pipelines.recipe import Recipe


def _evaluation(scores: np.ndarray, threshold: float = 1.0) -> Evaluation:
    labels = np.r_[np.zeros(100), np.ones(20)].astype(int)
    paths = [f"part{i}.png" for i in range(len(labels))]
    return Evaluation(paths, ["good"] * 100 + ["scratch"] * 20, labels, scores.astype(float), threshold)


@pytest.fixture
def fp32() -> Evaluation:
    rng = np.random.default_rng(0)
    return _evaluation(np.r_[rng.uniform(0.0, 0.9, 100), rng.uniform(0.6, 2.0, 20)])


def test_int8_within_both_tolerances_ships(fp32: Evaluation) -> None:
    int8 = _evaluation(fp32.scores * 1.3, threshold=1.3)  # another scale, the same ranking and verdicts
    record = choose_line_model(fp32, int8, Recipe())
    assert record["shipped"] == "int8" and record["verdict_flips"] == 0 and record["auroc_loss"] == pytest.approx(0)
    assert line_metrics(record)["line_int8"] == 1.0 and line_metrics(record)["int8_verdict_flips"] == 0.0
    assert "0 of 120 verdicts changed" in record["reason"] and "auroc_loss_interval" not in record


def test_the_auroc_loss_comes_with_its_interval_over_capture_groups(fp32: Evaluation) -> None:
    same = auroc_loss_interval(fp32, _evaluation(fp32.scores * 1.3, threshold=1.3), fp32.paths)
    assert (same.low, same.high) == (0.0, 0.0)  # paired: both models score the same parts in every resample
    scores = fp32.scores.copy()
    defects = np.flatnonzero(fp32.labels == 1)
    lost = defects[np.argsort(-scores[defects])[:4]]
    scores[lost] = 0.0  # four defects now ranked below every good
    int8 = _evaluation(scores)
    alone = auroc_loss_interval(fp32, int8, fp32.paths)
    record = choose_line_model(fp32, int8, Recipe(), groups=fp32.paths)
    assert 0.0 < alone.low < record["auroc_loss"] < alone.high
    assert record["auroc_loss_interval"] == [alone.low, alone.high]
    metrics = line_metrics(record)
    assert (metrics["int8_auroc_loss_low"], metrics["int8_auroc_loss_high"]) == (alone.low, alone.high)
    # the four lost defects photographed as one part (the rest as two): one piece of evidence, not four
    groups = ["lost" if i in lost else f"part{i % 2 if i in defects else i}" for i in range(120)]
    grouped = auroc_loss_interval(fp32, int8, groups)
    assert grouped.low <= 0.0 < alone.low


def test_changed_verdicts_keep_fp32_with_the_reason(fp32: Evaluation) -> None:
    scores = fp32.scores.copy()
    goods_near = np.flatnonzero((fp32.labels == 0) & (scores > 0.6))[:3]
    scores[goods_near] = 1.2  # three goods now flagged: 3 of 120 verdicts, over the 2 % tolerance
    int8 = _evaluation(scores)
    assert verdict_flips(fp32, int8) == (3, 120)
    record = choose_line_model(fp32, int8, Recipe())
    assert record["shipped"] == "fp32" and "3 of 120 verdicts changed" in record["reason"]
    loose = choose_line_model(fp32, int8, replace(Recipe(), int8_max_flip_rate=0.05, int8_max_auroc_loss=1.0))
    assert loose["shipped"] == "int8"


def test_a_ranking_loss_keeps_fp32_unless_int8_is_forced(fp32: Evaluation) -> None:
    scores = fp32.scores.copy()
    defects = np.flatnonzero(fp32.labels == 1)
    worst = defects[np.argsort(-scores[defects])[:4]]
    assert (scores[worst] > fp32.threshold).all()
    scores[worst] = 0.0  # the four clearest defects now below every good, and passed
    int8 = _evaluation(scores)
    record = choose_line_model(fp32, int8, Recipe())
    assert record["auroc_loss"] > 0.005 and record["shipped"] == "fp32" and "image AUROC" in record["reason"]
    forced = choose_line_model(fp32, int8, replace(Recipe(), line_precision="int8"))
    assert forced["shipped"] == "int8" and len(forced["outside_tolerance"]) == 2


def test_no_int8_candidate_ships_fp32_and_says_why(fp32: Evaluation) -> None:
    record = choose_line_model(fp32, None, Recipe(), "fewer than 8 golden goods")
    assert record == {
        "precision_asked": "auto",
        "fp32": record["fp32"],
        "shipped": "fp32",
        "reason": "fewer than 8 golden goods",
    }
    assert line_metrics(record) == {"line_int8": 0.0}
    with pytest.raises(ValueError, match="line_precision"):
        Recipe(line_precision="int4")  # type: ignore[arg-type]
