"""Tests of the work the calibrated fits share: cached error-feedback factors and the coordinate
descent that visits only moving rows give the fits of the direct computations; the capture's
inferred element types are kept per model structure."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dc.calibration import error_feedback, sharing_fit
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
        error_feedback._FEEDBACK_PLANS.clear()
        cached = [quantize_layer(p, weights, masks, 2**bits) for bits in (2, 3, 4)]
        fresh = []
        for bits in (2, 3, 4):
            error_feedback._FEEDBACK_PLANS.clear()
            fresh.append(quantize_layer(p, weights, masks, 2**bits))
        for a, b in zip(cached, fresh):
            np.testing.assert_array_equal(a.codes[0], b.codes[0])
            np.testing.assert_array_equal(a.centroids, b.centroids)

    def test_one_plan_per_mask_and_hessian(self) -> None:
        p = make_problem(1)
        cache = error_feedback._FeedbackPlanCache(1 << 20, 4)
        mask = select_mask(p, 0.5, "magnitude")[0]
        first = cache.plan(p.hessians[0], mask)
        assert cache.plan(p.hessians[0], mask.copy()) is first
        assert cache.plan(p.hessians[0].copy(), mask) is not first
        assert cache.plan(p.hessians[0], ~mask) is not first

    def test_an_entry_goes_with_its_hessian(self) -> None:
        p = make_problem(4)
        cache = error_feedback._FeedbackPlanCache(1 << 20, 4)
        hessian = p.hessians[0].copy()
        cache.plan(hessian, select_mask(p, 0.5, "magnitude")[0])
        assert len(cache._plans) == 1 and cache._bytes > 0
        del hessian
        assert not cache._plans and cache._bytes == 0

    def test_the_cache_stays_within_its_bounds(self) -> None:
        p = make_problem(2)
        cache = error_feedback._FeedbackPlanCache(1 << 20, 2)
        for sparsity in (0.2, 0.4, 0.6):
            cache.plan(p.hessians[0], select_mask(p, sparsity, "magnitude")[0])
        assert len(cache._plans) == 2
        small = error_feedback._FeedbackPlanCache(8, 4)
        plan = small.plan(p.hessians[0], select_mask(p, 0.5, "magnitude")[0])
        assert plan.factors is None and not small._plans
        for_the_call = error_feedback._FeedbackPlanCache(8, 4, call_bytes=1 << 20)
        plan = for_the_call.plan(p.hessians[0], select_mask(p, 0.5, "magnitude")[0])
        assert plan.factors is not None and not for_the_call._plans  # kept by its caller only
        assert plan.compact and all(f.dtype == np.float32 for f in plan.factors)  # in half the memory
        once = for_the_call.plan(p.hessians[0], select_mask(p, 0.5, "magnitude")[0], one_rounding=True)
        assert once.factors is None and not once.compact  # computed during its one rounding

    def test_compact_factors_round_as_the_full_ones(self) -> None:
        p = make_problem(3, k=60, n=12)
        masks = select_mask(p, 0.3, "magnitude")
        weights = refit_weights(p, masks)[0]
        compact = error_feedback._FeedbackPlan(p.hessians[0], masks[0], 8, 1 << 20)
        full = error_feedback._FeedbackPlan(p.hessians[0], masks[0], 1 << 20)
        assert compact.compact and not full.compact
        centroids = np.quantile(weights[masks[0]], np.linspace(0.02, 0.98, 16))
        mid = 0.5 * (centroids[1:] + centroids[:-1])
        np.testing.assert_array_equal(compact.codes(weights, centroids, mid), full.codes(weights, centroids, mid))

    def test_factors_computed_a_few_columns_at_a_time_equal_one_stack(self, monkeypatch: pytest.MonkeyPatch) -> None:
        p = make_problem(6, k=50, n=10)
        mask = select_mask(p, 0.4, "magnitude")[0]
        whole = error_feedback._FeedbackPlan(p.hessians[0], mask, 1 << 30)
        monkeypatch.setattr(error_feedback, "_FACTOR_CHUNK_BYTES", 1)  # one column per factorisation
        chunked = error_feedback._FeedbackPlan(p.hessians[0], mask, 1 << 30)
        assert len(whole.batches) == 1 and len(whole.batches[0]) == p.targets[0].shape[1]  # one padded stack
        assert len({rows.size for rows, _ in whole.batches[0]}) > 1  # of columns padded by different amounts
        np.testing.assert_allclose(chunked.factors[0], whole.factors[0], rtol=0, atol=1e-12)


def test_the_plan_cache_is_shared_safely_by_threads() -> None:
    """Layers are fitted in threads (compress_with_calibration's jobs): concurrent lookups, inserts and
    evictions keep the cache's entries and byte count consistent."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [make_problem(seed) for seed in range(8)]
    masks = [select_mask(p, 0.5, "magnitude")[0] for p in problems]
    cache = error_feedback._FeedbackPlanCache(1 << 20, 3)

    def request(i: int) -> None:
        for _ in range(20):
            assert cache.plan(problems[i % 8].hessians[0], masks[i % 8]).factors is not None

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(request, range(16)))
    assert len(cache._plans) <= 3
    assert cache._bytes == sum(plan.factor_bytes for _, plan in cache._plans.values())


def reassign_row_by_row(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, centroids: np.ndarray
) -> np.ndarray:
    """The coordinate descent visiting every input row in turn (one sweep): the reference."""
    codes = codes.copy()
    values = np.where(codes >= 0, centroids[np.maximum(codes, 0)], 0.0)
    residual = hessian @ (values - target)
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    for j in range(codes.shape[0]):
        h_jj = hessian[j, j]
        cols = np.flatnonzero(codes[j] >= 0)
        if h_jj <= 0 or cols.size == 0:
            continue
        current = values[j, cols]
        new = np.searchsorted(mid, current - residual[j, cols] / h_jj, side="left")
        delta = centroids[new] - current
        move = (delta != 0) & (2.0 * delta * residual[j, cols] + delta * delta * h_jj < 0)
        cols, new, delta = cols[move], new[move], delta[move]
        codes[j, cols] = new
        values[j, cols] += delta
        residual[:, cols] += np.outer(hessian[:, j], delta)
    return codes


class TestReassignVisitsOnlyMovingRows:
    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.parametrize("n_clusters", [2, 5, 16])
    def test_the_codes_of_the_row_by_row_sweep(self, seed: int, n_clusters: int) -> None:
        p = make_problem(seed, k=30, n=12)
        rng = np.random.default_rng(seed)
        codes = rng.integers(0, n_clusters, size=p.targets[0].shape).astype(np.int32)
        codes[rng.random(codes.shape) < 0.3] = -1
        centroids = np.sort(rng.standard_normal(n_clusters))
        expected = reassign_row_by_row(p.hessians[0], p.targets[0], codes, centroids)
        got = sharing_fit.reassign_codes(p, [codes], centroids)[0]
        np.testing.assert_array_equal(got, expected)

    def test_a_row_without_curvature_never_moves(self) -> None:
        p = make_problem(3, k=10, n=4)
        p.hessians[0][4, :] = 0.0
        p.hessians[0][:, 4] = 0.0
        codes = np.zeros(p.targets[0].shape, dtype=np.int32)
        centroids = np.array([-1.0, 0.0, 1.0])
        got = sharing_fit.reassign_codes(p, [codes], centroids)[0]
        np.testing.assert_array_equal(got[4], codes[4])
        np.testing.assert_array_equal(got, reassign_row_by_row(p.hessians[0], p.targets[0], codes, centroids))


class TestValueTypesKeptPerStructure:
    def test_models_differing_in_initializer_values_share_their_types(self) -> None:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from onnx_dc.calibration import capture

        def model(value: float, cast_to: int = TensorProto.DOUBLE) -> onnx.ModelProto:
            weight = numpy_helper.from_array(np.full((2, 2), value, np.float32), "w")
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Cast", ["y"], ["z"], to=cast_to)]
            graph = helper.make_graph(
                nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                [helper.make_tensor_value_info("z", cast_to, [1, 2])], [weight],
            )
            return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

        first = capture._value_types(model(1.0))
        assert capture._value_types(model(2.0)) is first
        assert first["y"].type.tensor_type.elem_type == TensorProto.FLOAT
        other = capture._value_types(model(1.0, TensorProto.FLOAT16))
        assert other is not first and other["z"].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.parametrize("size", [1, 7, 64, 65, 200])
def test_feedback_factor_gives_gptq_s_factor_of_the_inverse(size: int) -> None:
    rng = np.random.default_rng(size)
    stack = []
    for _ in range(3):
        x = rng.standard_normal((2 * size + 3, size)) * rng.gamma(1.0, 1.0, size)
        stack.append(x.T @ x + 1e-3 * np.eye(size))
    stack = np.stack(stack)
    lower = error_feedback._feedback_factor(np.ascontiguousarray(stack[:, ::-1, ::-1]))
    assert np.all(np.triu(lower, 1) == 0)
    upper = lower[:, ::-1, ::-1]  # V = J L J, H = V V^T
    assert np.allclose(upper @ np.swapaxes(upper, -1, -2), stack, rtol=1e-9, atol=1e-9 * np.max(np.abs(stack)))
    gptq = np.swapaxes(np.linalg.cholesky(np.linalg.inv(stack)), -1, -2)  # U, H^-1 = U^T U
    assert np.allclose(np.linalg.inv(upper), gptq, rtol=1e-7, atol=1e-9 * np.max(np.abs(gptq)))


def test_reversed_padded_hessians_put_the_identity_first_and_reverse_the_rows() -> None:
    from onnx_dc.calibration.pruning_fit import padded_hessians

    hessian = np.arange(36.0).reshape(6, 6)
    batch = [(np.array([4, 1, 2]), np.array([0])), (np.array([5]), np.array([1]))]
    stack = padded_hessians(hessian, batch, reverse=True)
    assert np.array_equal(stack[0], hessian[np.ix_([2, 1, 4], [2, 1, 4])])
    assert np.array_equal(stack[1], np.diag([1.0, 1.0, hessian[5, 5]]))


def test_feedback_factor_gives_the_identity_to_a_matrix_that_is_not_positive_definite() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 100))
    good = x.T @ x
    bad = good.copy()
    bad[70, 70] = -1.0  # not positive definite
    factors = error_feedback._feedback_factor(np.stack([good, bad]))
    assert np.array_equal(factors[1], np.eye(100))
    assert np.allclose(factors[0] @ factors[0].T, good, rtol=1e-9, atol=1e-9 * np.max(np.abs(good)))
