"""Tests of the shared work of onnx_dc.calibration.sharing_fit: cached error-feedback factors,
the centroid system from one sparse product, and the blocked coordinate descent give the fits
of the direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dc.calibration import sharing_fit
from onnx_dc.calibration.layer_problem import LayerProblem
from onnx_dc.calibration.pruning_fit import refit_weights, select_mask
from onnx_dc.calibration.sharing_fit import quantize_layer


def make_problem(seed: int, k: int = 40, n: int = 9, rows: int = 120) -> LayerProblem:
    """A random layer with correlated inputs and random target weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ rng.standard_normal((k, k))
    return LayerProblem([x.T @ x], [rng.standard_normal((k, n))])


class TestFeedbackPlanCache:
    def test_cached_plans_give_the_same_fits_as_fresh_ones(self, monkeypatch: pytest.MonkeyPatch) -> None:
        p = make_problem(0)
        masks = select_mask(p, 0.5, "magnitude")
        weights = refit_weights(p, masks)
        sharing_fit._FEEDBACK_PLANS.clear()
        cached = [quantize_layer(p, weights, masks, 2**bits) for bits in (2, 3, 4)]
        fresh = []
        for bits in (2, 3, 4):
            sharing_fit._FEEDBACK_PLANS.clear()
            fresh.append(quantize_layer(p, weights, masks, 2**bits))
        for a, b in zip(cached, fresh):
            np.testing.assert_array_equal(a.codes[0], b.codes[0])
            np.testing.assert_array_equal(a.centroids, b.centroids)

    def test_one_plan_per_mask_and_hessian(self) -> None:
        p = make_problem(1)
        cache = sharing_fit._FeedbackPlanCache(1 << 20, 4)
        mask = select_mask(p, 0.5, "magnitude")[0]
        first = cache.plan(p.hessians[0], mask)
        assert cache.plan(p.hessians[0], mask.copy()) is first
        assert cache.plan(p.hessians[0].copy(), mask) is not first
        assert cache.plan(p.hessians[0], ~mask) is not first

    def test_the_cache_stays_within_its_bounds(self) -> None:
        p = make_problem(2)
        cache = sharing_fit._FeedbackPlanCache(1 << 20, 2)
        for sparsity in (0.2, 0.4, 0.6):
            cache.plan(p.hessians[0], select_mask(p, sparsity, "magnitude")[0])
        assert len(cache._plans) == 2
        small = sharing_fit._FeedbackPlanCache(8, 4)
        plan = small.plan(p.hessians[0], select_mask(p, 0.5, "magnitude")[0])
        assert plan.factors is None and not small._plans
