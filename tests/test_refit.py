"""Tests of onnx_dc.calibration.sharing_fit: every fit minimises (never increases) the reconstruction error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.errors import InvalidTensorError, SettingsError
from onnx_dc.calibration.layer_problem import CRITERIA, LayerProblem
from onnx_dc.calibration.sharing_fit import assign_with_error_feedback, fit_layer, quantize_layer, reassign_codes, refit_centroids
from onnx_dc.calibration.pruning_fit import pruning_path, pruning_scores, refit_weights, select_mask


def make_problem(seed: int, k: int = 12, n: int = 7, rows: int = 40, blocks: int = 1, damping: float = 0.01):
    """A random layer: correlated inputs (so the Gram matrix matters) and random target weights."""
    rng = np.random.default_rng(seed)
    grams, targets = [], []
    for _ in range(blocks):
        mixing = rng.standard_normal((k, k))
        x = rng.standard_normal((rows, k)) @ mixing
        x[:, rng.integers(k)] = 0.0  # a dead input feature
        grams.append(x.T @ x)
        targets.append(rng.standard_normal((k, n)))
    return LayerProblem(grams, targets, damping=damping)


def random_codes(problem: LayerProblem, k: int, seed: int, density: float = 0.6):
    rng = np.random.default_rng(seed)
    codes = []
    for t in problem.targets:
        c = rng.integers(0, k, size=t.shape)
        c[rng.random(t.shape) > density] = -1
        codes.append(c)
    return codes


def dequantize(codes, centroids):
    out = []
    for c in codes:
        w = np.zeros(c.shape)
        w[c >= 0] = centroids[c[c >= 0]]
        out.append(w)
    return out


seeds = st.integers(0, 2**31 - 1)


class TestLayerProblem:
    def test_error_is_the_damped_quadratic(self):
        p = make_problem(0)
        w = [np.zeros_like(p.targets[0])]
        d = w[0] - p.targets[0]
        lam = 0.01 * np.mean(np.diag(p.grams[0]))
        expected = np.trace(d.T @ (p.grams[0] + lam * np.eye(12)) @ d)
        assert p.error(w) == pytest.approx(expected, rel=1e-12)
        assert p.output_error(w) == pytest.approx(np.trace(d.T @ p.grams[0] @ d), rel=1e-12)
        assert p.relative_error(w) == pytest.approx(1.0)
        assert p.relative_error(p.targets) == 0.0

    def test_damped_relative_error_charges_unexcited_inputs(self):
        """Removing the weights of an input the data never excite is free by the plain error, not the damped one."""
        gram = np.diag([4.0, 1.0, 0.0])
        target = np.array([[1.0, -2.0], [0.5, 1.0], [3.0, 3.0]])
        p = LayerProblem([gram], [target], damping=0.01)
        silent_removed = target.copy()
        silent_removed[2] = 0.0
        assert p.relative_error([silent_removed]) == 0.0
        lam = 0.01 * np.mean(np.diag(gram))
        expected = lam * 18.0 / np.trace(target.T @ (gram + lam * np.eye(3)) @ target)
        assert p.damped_relative_error([silent_removed]) == pytest.approx(expected, rel=1e-12)
        assert p.damped_relative_error([np.zeros_like(target)]) == pytest.approx(1.0)
        assert p.damped_relative_error([target]) == 0.0

    def test_rejects_bad_shapes_and_values(self):
        with pytest.raises(InvalidTensorError):
            LayerProblem([np.eye(3)], [np.ones((4, 2))])
        with pytest.raises(InvalidTensorError):
            LayerProblem([np.ones((3, 4))], [np.ones((3, 2))])
        with pytest.raises(InvalidTensorError):
            LayerProblem([np.eye(3) * np.nan], [np.ones((3, 2))])
        with pytest.raises(SettingsError):
            LayerProblem([np.eye(3)], [np.ones((3, 2))], damping=-1)
        p = make_problem(1)
        with pytest.raises(InvalidTensorError):
            p.error([np.zeros((3, 3))])

    def test_all_zero_gram_still_has_a_unique_minimiser(self):
        p = LayerProblem([np.zeros((4, 4))], [np.arange(8.0).reshape(4, 2)])
        masks = [np.array([[True, False]] * 4)]
        w = refit_weights(p, masks)[0]
        np.testing.assert_allclose(w[:, 0], p.targets[0][:, 0])
        assert np.all(w[:, 1] == 0)


class TestPruning:
    def test_scores(self):
        p = make_problem(2)
        t = p.targets[0]
        np.testing.assert_allclose(pruning_scores(p, "magnitude")[0], np.abs(t))
        norms = np.sqrt(np.diag(p.grams[0]))
        np.testing.assert_allclose(pruning_scores(p, "activation")[0], np.abs(t) * norms[:, None])
        inv_diag = np.diag(np.linalg.inv(p.hessians[0]))
        np.testing.assert_allclose(pruning_scores(p, "obs")[0], t**2 / inv_diag[:, None], rtol=1e-8)
        with pytest.raises(SettingsError):
            pruning_scores(p, "random")

    @pytest.mark.parametrize("criterion", CRITERIA)
    def test_select_mask_exact_count_over_blocks(self, criterion):
        p = make_problem(3, blocks=3)
        masks = select_mask(p, 0.7, criterion)
        total = sum(m.size for m in masks)
        removed = sum(np.count_nonzero(~m) for m in masks)
        assert removed == int(np.floor(0.7 * total + 0.5))

    def test_activation_aware_prunes_dead_features_first(self):
        p = make_problem(4)
        dead = np.flatnonzero(np.diag(p.grams[0]) == 0)
        assert dead.size == 1
        masks = select_mask(p, 7 / p.n_weights, "activation")  # exactly one row's worth
        assert not np.any(masks[0][dead[0]])

    def test_pruning_path_is_nested_and_exact(self):
        p = make_problem(5, k=20, n=9)
        sparsities = [0.9, 0.3, 0.6]
        results = pruning_path(p, sparsities)
        by_sparsity = dict(zip(sparsities, results))
        previous = None
        for s in sorted(sparsities):
            masks, weights = by_sparsity[s]
            assert np.count_nonzero(~masks[0]) == int(np.floor(s * p.n_weights + 0.5))
            assert np.all(weights[0][~masks[0]] == 0)
            if previous is not None:
                assert np.all(masks[0] <= previous)  # nothing pruned comes back
            previous = masks[0]
            # the weights are the least-squares refit for their mask
            np.testing.assert_allclose(weights[0], refit_weights(p, masks)[0], atol=1e-9)

    def test_pruning_path_ends(self):
        p = make_problem(6)
        (full_masks, full_w), (none_masks, none_w) = pruning_path(p, [0.0, 1.0])
        assert np.all(full_masks[0]) and np.array_equal(full_w[0], p.targets[0])
        assert not np.any(none_masks[0]) and np.all(none_w[0] == 0)
        with pytest.raises(SettingsError):
            pruning_path(p, [0.5], rate=1.0)
        with pytest.raises(SettingsError):
            pruning_path(p, [1.5])


class TestRefitWeights:
    @settings(max_examples=40, deadline=None)
    @given(seed=seeds, sparsity=st.floats(0.0, 0.95))
    def test_refit_is_the_minimiser_for_its_mask(self, seed, sparsity):
        p = make_problem(seed % 1000, blocks=1 + seed % 2)
        masks = select_mask(p, sparsity, "magnitude")
        refitted = refit_weights(p, masks)
        masked = [t * m for t, m in zip(p.targets, masks)]
        e = p.error(refitted)
        assert e <= p.error(masked) * (1 + 1e-9) + 1e-9
        for w, m in zip(refitted, masks):
            assert np.all(w[~m] == 0)
        # any perturbation of the kept weights is worse (first-order optimality)
        rng = np.random.default_rng(seed)
        for _ in range(3):
            moved = [w + 1e-3 * rng.standard_normal(w.shape) * m for w, m in zip(refitted, masks)]
            assert p.error(moved) >= e * (1 - 1e-9) - 1e-9

    def test_columns_with_equal_masks_share_a_solve(self):
        p = make_problem(7, n=5)
        masks = [np.ones((12, 5), dtype=bool)]
        masks[0][:4, :] = False
        w = refit_weights(p, masks)[0]
        h = p.hessians[0]
        s = np.arange(4, 12)
        expected = np.linalg.solve(h[np.ix_(s, s)], (h @ p.targets[0])[s])
        np.testing.assert_allclose(w[s], expected, rtol=1e-9, atol=1e-9)


    @pytest.mark.parametrize("batch_bytes", [1 << 25, 2_000])  # all single columns in one stack, or a few per stack
    def test_single_columns_solved_in_padded_stacks_equal_their_own_solves(self, monkeypatch, batch_bytes):
        from onnx_dc.calibration import pruning_fit

        monkeypatch.setattr(pruning_fit, "_REFIT_BATCH_BYTES", batch_bytes)
        p = make_problem(11, k=12, n=9)
        rng = np.random.default_rng(11)
        mask = rng.random((12, 9)) < 0.7  # (almost) every column its own mask
        mask[:, 8] = mask[:, 7]  # two columns sharing one
        mask[:, 6] = False  # a column with nothing kept
        w = refit_weights(p, [mask])[0]
        h, ht = p.hessians[0], p.hessians[0] @ p.targets[0]
        for n in range(9):
            s = np.flatnonzero(mask[:, n])
            if s.size:
                np.testing.assert_allclose(w[s, n], np.linalg.solve(h[np.ix_(s, s)], ht[s, n]), rtol=1e-8, atol=1e-10)
            assert np.all(w[~mask[:, n], n] == 0)


class TestCentroids:
    @settings(max_examples=40, deadline=None)
    @given(seed=seeds, k=st.integers(1, 9), density=st.floats(0.05, 1.0))
    def test_centroid_refit_never_increases_the_error(self, seed, k, density):
        p = make_problem(seed % 997, blocks=1 + seed % 3)
        codes = random_codes(p, k, seed, density)
        centroids = np.sort(np.random.default_rng(seed).standard_normal(k))
        new = refit_centroids(p, codes, centroids)
        assert p.error(dequantize(codes, new)) <= p.error(dequantize(codes, centroids)) * (1 + 1e-9) + 1e-9
        # clusters nobody uses keep their value
        used = set(np.concatenate([c[c >= 0] for c in codes]).tolist())
        for c in range(k):
            if c not in used:
                assert new[c] == centroids[c]

    def test_centroid_refit_is_the_least_squares_solution(self):
        p = make_problem(8)
        k = 4
        codes = random_codes(p, k, 8)
        new = refit_centroids(p, codes, np.zeros(k))
        # brute force: E(mu) = ||L^T (sum_c mu_c A_c - T)||^2 with H = L L^T, a linear least-squares problem in mu
        lower = np.linalg.cholesky(p.hessians[0])
        design = np.stack([(lower.T @ (codes[0] == c)).ravel() for c in range(k)], axis=1)
        target = (lower.T @ p.targets[0]).ravel()
        expected = np.linalg.lstsq(design, target, rcond=None)[0]
        np.testing.assert_allclose(new, expected, rtol=1e-7, atol=1e-9)

    def test_dense_and_sparse_system_paths_agree(self):
        # a layer with every weight kept takes the dense product path, a sparse one the per-column path
        from onnx_dc.calibration.sharing_fit import _centroid_system

        p = make_problem(9, k=30, n=40)
        rng = np.random.default_rng(9)
        codes = rng.integers(0, 3, size=(30, 40))
        m_dense, r_dense = _centroid_system(p.hessians[0], p.targets[0], codes, 3)
        k = 3
        m_ref = np.zeros((k, k))
        for c in range(k):
            for d in range(k):
                m_ref[c, d] = np.sum((codes == c) * (p.hessians[0] @ (codes == d)))
        np.testing.assert_allclose(m_dense, m_ref, rtol=1e-9)
        sparse_codes = codes.copy()
        sparse_codes[rng.random(codes.shape) < 0.9] = -1
        m_sparse, _ = _centroid_system(p.hessians[0], p.targets[0], sparse_codes, k)
        m_ref2 = np.zeros((k, k))
        for c in range(k):
            for d in range(k):
                m_ref2[c, d] = np.sum((sparse_codes == c) * (p.hessians[0] @ (sparse_codes == d)))
        np.testing.assert_allclose(m_sparse, m_ref2, rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize("seed", range(6))
    def test_per_column_system_path_sums_h_ss_by_code(self, seed, monkeypatch):
        # the path of sparse layers: per column, H_SS summed over the runs of each code (column weights too)
        from onnx_dc.calibration import sharing_fit as refit

        monkeypatch.setattr(refit, "_per_column_is_cheaper", lambda *args: True)
        rng = np.random.default_rng(seed)
        p, _ = weighted_problem(seed, k=25, n=9)
        k = int(rng.integers(2, 12))
        codes = rng.integers(0, k, size=(25, 9))
        codes[rng.random(codes.shape) < [0.0, 0.3, 0.9][seed % 3]] = -1
        codes[:, seed % 9] = -1  # a column with every weight pruned
        system, _ = refit._centroid_system(p.hessians[0], p.targets[0], codes, k, p.column_weights[0])
        expected = np.zeros((k, k))
        for c in range(k):
            for d in range(k):
                expected[c, d] = np.sum((codes == c) * (p.hessians[0] @ (codes == d)) * p.column_weights[0][None, :])
        np.testing.assert_allclose(system, expected, rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize("seed", range(6))
    def test_many_small_blocks_sum_their_pairs_in_one_system(self, seed):
        # grouped and depthwise convolutions: one bincount over every block's pairs of kept rows
        from onnx_dc.calibration import sharing_fit as refit

        rng = np.random.default_rng(seed)
        p, plain = weighted_problem(seed, blocks=2 + seed, k=9, n=[1, 3][seed % 2])
        problem = p if seed % 3 else plain  # with and without column weights
        assert refit._pair_sums_apply(problem)
        k = int(rng.integers(2, 40))
        codes = [rng.integers(-1, k, size=t.shape).astype(np.int32) for t in problem.targets]
        system, rhs = refit._small_blocks_system(problem, codes, k)
        expected_m, expected_r = np.zeros((k, k)), np.zeros(k)
        for h, t, c, w in zip(problem.hessians, problem.targets, codes, problem.column_weights):
            m_block, r_block = refit._centroid_system(h, t, c, k, w)
            expected_m += m_block
            expected_r += r_block
        np.testing.assert_allclose(system, expected_m, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rhs, expected_r, rtol=1e-9, atol=1e-12)
        assert not refit._pair_sums_apply(make_problem(seed, k=9, n=3))  # one block: the kept systems

    def test_one_hot_and_per_centroid_dense_paths_agree(self, monkeypatch):
        # small blocks build one one-hot matrix; larger ones loop over the centroids in use
        from onnx_dc.calibration import sharing_fit as refit

        p = make_problem(4, k=12, n=5)
        codes = np.random.default_rng(4).integers(-1, 6, size=(12, 5))
        m_onehot, r_onehot = refit._centroid_system(p.hessians[0], p.targets[0], codes, 8)
        monkeypatch.setattr(refit, "_ONEHOT_MAX_ELEMENTS", 0)
        m_loop, r_loop = refit._centroid_system(p.hessians[0], p.targets[0], codes, 8)
        np.testing.assert_allclose(m_onehot, m_loop, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(r_onehot, r_loop)
        assert np.all(m_onehot[6:] == 0) and np.any(m_onehot[:6] != 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9), changed=st.floats(0.0, 0.3), weighted=st.booleans())
def test_centroid_systems_updated_from_changed_codes_equal_rebuilt_ones(seed, k, changed, weighted):
    """_CentroidSystems: a refit after a few changed codes (and after a renumbering of the codes) gives
    the system and centroids that building it again gives."""
    from onnx_dc.calibration import sharing_fit as refit

    first, second = make_problem(seed, k=14, n=9), make_problem(seed + 1, k=10, n=7)  # shapes differ: block by block
    grams, targets = first.grams + second.grams, first.targets + second.targets
    rng = np.random.default_rng(seed)
    weights = [rng.random(t.shape[1]) + 0.1 for t in targets] if weighted else None
    p = LayerProblem(grams, targets, column_weights=weights)
    assert not refit._pair_sums_apply(p)
    codes = [np.where(rng.random(t.shape) < 0.3, -1, rng.integers(0, k, t.shape)).astype(np.int32) for t in p.targets]
    centroids = np.sort(rng.standard_normal(k))
    systems = refit._CentroidSystems(p)
    systems.refit(codes, centroids)
    rank = rng.permutation(k)
    systems.relabel(rank)
    codes = [refit._relabelled(c, rank) for c in codes]
    new_codes = []
    for c in codes:
        n = c.copy()
        move = (rng.random(c.shape) < changed) & (c >= 0)
        n[move] = rng.integers(0, k, int(move.sum()))
        new_codes.append(n)
    updated = systems.refit(new_codes, centroids)
    np.testing.assert_allclose(updated, refit_centroids(p, new_codes, centroids), rtol=1e-8, atol=1e-10)
    for matrix, h, t, c, w in zip(systems.matrices, p.hessians, p.targets, new_codes, p.column_weights):
        rebuilt, _ = refit._centroid_system(h, t, c, k, w)
        np.testing.assert_allclose(matrix, rebuilt, rtol=1e-9, atol=1e-9 * np.max(np.abs(rebuilt)))


@pytest.mark.parametrize("size", [1, 64, 65, 150])
def test_inverse_cholesky_and_the_solves_built_on_it(size):
    from onnx_dc.calibration.layer_problem import _inverse_spd, _solve_spd, inverse_cholesky

    rng = np.random.default_rng(size)
    x = rng.standard_normal((2 * size + 5, size))
    matrix = x.T @ x + 0.1 * np.eye(size)
    inverse_lower = inverse_cholesky(matrix[None])[0]
    np.testing.assert_allclose(inverse_lower, np.linalg.inv(np.linalg.cholesky(matrix)), rtol=1e-9, atol=1e-12)
    assert np.all(np.triu(inverse_lower, 1) == 0)
    rhs = rng.standard_normal((size, 3))
    np.testing.assert_allclose(_solve_spd(matrix, rhs), np.linalg.solve(matrix, rhs), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(_inverse_spd(matrix), np.linalg.inv(matrix), rtol=1e-8, atol=1e-10)
    singular = np.zeros((size, size))
    singular[0, 0] = 1.0 if size > 1 else 0.0  # not positive definite: the pseudo-inverse
    np.testing.assert_allclose(_inverse_spd(singular), np.linalg.pinv(singular))
    with pytest.raises(np.linalg.LinAlgError):
        inverse_cholesky(singular[None])


def test_single_threaded_blas_restores_the_thread_count():
    from threadpoolctl import threadpool_info

    from onnx_dc.calibration.layer_problem import single_threaded_blas

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    with single_threaded_blas():
        assert all(n == 1 for n in blas_threads())
        with single_threaded_blas():  # nested use is fine
            pass
    assert blas_threads() == before


class TestReassign:
    @settings(max_examples=40, deadline=None)
    @given(seed=seeds, k=st.integers(1, 8))
    def test_reassignment_never_increases_the_error(self, seed, k):
        p = make_problem(seed % 991, blocks=1 + seed % 2)
        codes = random_codes(p, k, seed)
        centroids = np.sort(np.random.default_rng(seed + 1).standard_normal(k))
        new = reassign_codes(p, codes, centroids, sweeps=2)
        assert p.error(dequantize(new, centroids)) <= p.error(dequantize(codes, centroids)) * (1 + 1e-9) + 1e-9
        for a, b in zip(codes, new):
            assert np.array_equal(a < 0, b < 0)  # pruned stay pruned, kept stay kept

    def test_needs_sorted_centroids(self):
        p = make_problem(10)
        with pytest.raises(SettingsError):
            reassign_codes(p, random_codes(p, 2, 0), np.array([1.0, -1.0]))


class TestManyClusters:
    """From _FEEDBACK_ONLY_CLUSTERS centroids (7-8 bits): one error-feedback rounding, then re-assignments."""

    @staticmethod
    def recorded_starts(monkeypatch: pytest.MonkeyPatch, ef_error: float | None = None) -> list[str]:
        from onnx_dc.calibration import sharing_fit

        starts: list[str] = []
        alternate = sharing_fit._alternate

        def recording(problem, codes, centroids, error, rounds, history, **kwargs):
            nearest = bool(history)  # the nearest run's history holds the k-means E; the feedback runs' starts empty
            refits = kwargs.get("refit_centroids", True)
            starts.append(("nearest" if nearest else "feedback") + ("" if refits else " (re-assignments)"))
            result = alternate(problem, codes, centroids, error, rounds, history, **kwargs)
            return result if nearest or ef_error is None else (result[0], result[1], ef_error)

        monkeypatch.setattr(sharing_fit, "_alternate", recording)
        return starts

    @staticmethod
    def layer():
        p = make_problem(5, k=40, n=9, rows=120)
        masks = select_mask(p, 0.1, "magnitude")
        return p, refit_weights(p, masks), masks

    def test_the_nearest_run_only_below_the_threshold(self, monkeypatch: pytest.MonkeyPatch) -> None:
        p, weights, masks = self.layer()
        starts = self.recorded_starts(monkeypatch)
        q = quantize_layer(p, weights, masks, 128)
        assert starts and not any(s.startswith("nearest") for s in starts)
        assert len(q.history) <= 1 + len(starts)  # the k-means E, then each lower E a feedback run ended with
        starts.clear()
        quantize_layer(p, weights, masks, 64)
        assert starts[0] == "nearest" and "feedback" in starts

    def test_one_feedback_rounding_then_reassignments_alone(self, monkeypatch: pytest.MonkeyPatch) -> None:
        p, weights, masks = self.layer()
        starts = self.recorded_starts(monkeypatch)
        q = quantize_layer(p, weights, masks, 128)
        assert starts == ["feedback (re-assignments)"]
        plain = quantize_layer(p, weights, masks, 128, refit=False)
        np.testing.assert_array_equal(q.centroids, plain.centroids)  # the k-means centroids, never refitted
        assert q.error < plain.error
        starts.clear()
        quantize_layer(p, weights, masks, 64)
        assert starts.count("feedback") >= 1 and all(s in ("nearest", "feedback") for s in starts)

    def test_the_nearest_run_when_error_feedback_never_lowers_e(self, monkeypatch: pytest.MonkeyPatch) -> None:
        p, weights, masks = self.layer()
        nearest_only = quantize_layer(p, weights, masks, 128, error_feedback=False)
        starts = self.recorded_starts(monkeypatch, ef_error=float("inf"))
        q = quantize_layer(p, weights, masks, 128)
        assert starts == ["feedback (re-assignments)", "nearest"]
        assert q.history == nearest_only.history
        for a, b in zip(q.codes, nearest_only.codes):
            np.testing.assert_array_equal(a, b)


class TestQuantizeAndFit:
    @settings(max_examples=25, deadline=None)
    @given(seed=seeds, bits=st.integers(1, 4), sparsity=st.floats(0.0, 0.9))
    def test_quantize_history_is_non_increasing(self, seed, bits, sparsity):
        p = make_problem(seed % 983, k=16, n=8, blocks=1 + seed % 2)
        masks = select_mask(p, sparsity, "activation")
        weights = refit_weights(p, masks)
        q = quantize_layer(p, weights, masks, 2**bits)
        assert all(b <= a * (1 + 1e-12) for a, b in zip(q.history, q.history[1:]))
        assert q.error == pytest.approx(p.error(q.weights), rel=1e-9, abs=1e-9)
        values = np.concatenate([w[m] for w, m in zip(q.weights, masks)])
        assert np.unique(values).size <= 2**bits
        for w, m in zip(q.weights, masks):
            assert np.all(w[~m] == 0)
        plain = quantize_layer(p, weights, masks, 2**bits, refit=False)
        assert q.error <= plain.error * (1 + 1e-12) + 1e-12
        assert q.history[0] == plain.error
        # The error-feedback start only adds a second run: never worse than the nearest-centroid run alone.
        nearest_only = quantize_layer(p, weights, masks, 2**bits, error_feedback=False)
        assert q.error <= nearest_only.error * (1 + 1e-12) + 1e-12
        assert q.history[: len(nearest_only.history)] == nearest_only.history

    def test_fit_layer_auto_picks_the_lowest_pruned_error(self):
        p = make_problem(11, k=24, n=10, rows=80)
        fit = fit_layer(p, sparsity=0.8, bits=3)
        assert set(fit.errors_by_criterion) <= set(CRITERIA)
        assert fit.criterion == min(fit.errors_by_criterion, key=fit.errors_by_criterion.get)
        assert fit.error == pytest.approx(p.error(fit.weights))
        single = fit_layer(p, sparsity=0.8, bits=3, criterion=fit.criterion)
        assert single.error == pytest.approx(fit.error)
        assert np.count_nonzero(~fit.masks[0]) == int(np.floor(0.8 * 240 + 0.5))

    def test_fit_layer_is_deterministic(self):
        p = make_problem(12)
        a = fit_layer(p, sparsity=0.5, bits=2, init="random", seed=3)
        b = fit_layer(p, sparsity=0.5, bits=2, init="random", seed=3)
        assert np.array_equal(a.quantized.codes[0], b.quantized.codes[0])
        assert np.array_equal(a.quantized.centroids, b.quantized.centroids)

    def test_calibrated_fit_beats_plain_magnitude(self):
        p = make_problem(13, k=30, n=12, rows=200)
        plain = fit_layer(p, sparsity=0.7, bits=3, criterion="magnitude", refit_weights_first=False, refit_centroids_rounds=0)
        tuned = fit_layer(p, sparsity=0.7, bits=3)
        assert tuned.error < plain.error

    def test_settings_are_checked(self):
        p = make_problem(14)
        with pytest.raises(SettingsError):
            fit_layer(p, sparsity=0.5, bits=9)
        with pytest.raises(SettingsError):
            fit_layer(p, sparsity=-0.1, bits=3)
        with pytest.raises(SettingsError):
            fit_layer(p, sparsity=0.5, bits=3, criterion="largest")
        with pytest.raises(SettingsError):
            quantize_layer(p, p.targets, [np.ones((12, 7), dtype=bool)], 4, init="nope")


def feedback_reference(problem: LayerProblem, weights, masks, centroids):
    """Error-feedback rounding from its definition: after each rounded weight, the rows not yet
    rounded are re-solved exactly (least squares given the rounded ones), one column at a time."""
    codes = []
    for h, w, m in zip(problem.hessians, weights, masks):
        c = np.full(m.shape, -1)
        for n in range(m.shape[1]):
            rows = np.flatnonzero(m[:, n])
            rows = rows[np.argsort(-np.diag(h)[rows], kind="stable")]
            optimum = w[rows, n]
            fixed = np.zeros(0)
            for i in range(rows.size):
                free = rows[i:]
                done = rows[:i]
                # E restricted to the column's kept rows, with rows[:i] fixed at their centroids:
                # minimiser over the free rows is w*_free - H_ff^-1 H_fd (q_d - w*_d).
                shift = h[np.ix_(free, done)] @ (fixed - optimum[:i]) if i else np.zeros(free.size)
                current = optimum[i:] - np.linalg.solve(h[np.ix_(free, free)], shift)
                code = int(np.argmin(np.abs(centroids - current[0])))
                c[rows[i], n] = code
                fixed = np.append(fixed, centroids[code])
        codes.append(c)
    return codes


@pytest.mark.parametrize("seed", range(6))
def test_refits_through_the_pruned_rows_match_the_kept_rows_solves(seed, monkeypatch):
    """Lightly pruned columns are refitted from H^-1 and their pruned rows (OBS's set removal), with the
    saliencies [H_SS^-1]_jj from the same complement: equal to solving H_SS directly."""
    from onnx_dc.calibration import pruning_fit

    p = make_problem(seed, k=30, n=8, rows=90)
    masks = select_mask(p, [0.05, 0.2, 0.45][seed % 3], ["activation", "magnitude"][seed % 2])
    if seed % 4 == 3:  # identical column masks form one group of several columns
        masks = [np.repeat(m[:, :1], m.shape[1], axis=1) for m in masks]
    assert any(pruning_fit._by_complement(int(np.count_nonzero(c)), masks[0].shape[0]) for c in masks[0].T)
    fast = pruning_fit.refit_weights(p, masks)
    fast_saliency = pruning_fit._refit_all_with_saliency(p, masks)
    monkeypatch.setattr(pruning_fit, "_by_complement", lambda *args: False)
    direct = pruning_fit.refit_weights(p, masks)
    direct_saliency = pruning_fit._refit_all_with_saliency(p, masks)
    for a, b, m in zip(fast, direct, masks):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9 * np.max(np.abs(b)))
        assert np.all(a[~m] == 0)
    for (wa, sa), (wb, sb) in zip(fast_saliency, direct_saliency):
        np.testing.assert_allclose(wa, wb, rtol=1e-7, atol=1e-9 * np.max(np.abs(wb)))
        np.testing.assert_array_equal(np.isfinite(sa), np.isfinite(sb))
        np.testing.assert_allclose(sa[np.isfinite(sa)], sb[np.isfinite(sb)], rtol=1e-6)


def test_refits_of_a_singular_layer_fall_back_to_the_direct_solves():
    """Without damping a silent input makes H singular: no complement through H^-1, the direct (least-squares) path."""
    from onnx_dc.calibration import pruning_fit

    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 12))
    x[:, 4] = 0.0  # an input that is always zero
    p = LayerProblem([x.T @ x], [rng.standard_normal((12, 5))], damping=0.0)
    masks = select_mask(p, 0.2, "magnitude")
    (weights,) = refit_weights(p, masks)
    ((obs_weights, saliency),) = pruning_fit._refit_all_with_saliency(p, masks)
    assert np.all(np.isfinite(weights)) and np.all(weights[~masks[0]] == 0)
    np.testing.assert_allclose(obs_weights, weights, rtol=1e-6, atol=1e-9)
    assert p.error([weights]) <= p.error([p.targets[0] * masks[0]]) * (1 + 1e-9)


class TestErrorFeedback:
    @pytest.mark.parametrize("seed", range(8))
    def test_matches_the_exact_sequential_least_squares(self, seed):
        p = make_problem(seed, k=10, n=6, rows=60, blocks=1 + seed % 2)
        sparsity = [0.0, 0.5, 0.8][seed % 3]
        masks = select_mask(p, sparsity, "activation")
        if seed % 4 == 3:  # identical column masks share one factor
            masks = [np.repeat(m[:, :1], m.shape[1], axis=1) for m in masks]
        weights = refit_weights(p, masks)
        centroids = np.sort(np.random.default_rng(seed).standard_normal(5))
        codes = assign_with_error_feedback(p, weights, masks, centroids)
        for got, want, m in zip(codes, feedback_reference(p, weights, masks, centroids), masks):
            assert np.array_equal(got, want)
            assert np.array_equal(got >= 0, m)

    def test_correlated_errors_cancel(self):
        # Two copies of one input: nearest rounding of 0.3 + 0.3 onto {0, 1} gives 0 (output off by 0.6),
        # compensating the first rounding error on the second weight gives 0 + 1 (off by 0.4).
        p = LayerProblem([np.ones((2, 2))], [np.full((2, 1), 0.3)], damping=1e-9)
        masks = [np.ones((2, 1), dtype=bool)]
        codes = assign_with_error_feedback(p, p.targets, masks, np.array([0.0, 1.0]))
        assert sorted(codes[0][:, 0].tolist()) == [0, 1]
        values = dequantize(codes, np.array([0.0, 1.0]))
        assert p.error(values) < p.error([np.zeros((2, 1))])

    def test_singular_columns_fall_back_to_rounding(self):
        p = LayerProblem([np.zeros((4, 4))], [np.linspace(-1, 1, 12).reshape(4, 3)], damping=0.0)
        masks = [np.ones((4, 3), dtype=bool)]
        codes = assign_with_error_feedback(p, p.targets, masks, np.array([-1.0, 0.0, 1.0]))
        expected = np.argmin(np.abs(p.targets[0][..., None] - np.array([-1.0, 0.0, 1.0])), axis=-1)
        assert np.array_equal(codes[0], expected)

    def test_bad_centroids(self):
        p = make_problem(3)
        masks = [np.ones(p.targets[0].shape, dtype=bool)]
        with pytest.raises(SettingsError):
            assign_with_error_feedback(p, p.targets, masks, np.array([1.0, -1.0]))
        with pytest.raises(SettingsError):
            assign_with_error_feedback(p, p.targets, masks, np.array([]))

    @pytest.mark.parametrize("bits", [2, 3, 4])
    def test_feedback_start_beats_nearest_rounding_on_correlated_layers(self, bits):
        from onnx_dc.codec.clustering import assign_to_centroids, kmeans_1d

        for seed in range(10):
            p = make_problem(100 + seed, k=24, n=12, rows=200)
            masks = select_mask(p, 0.5, "obs")
            weights = refit_weights(p, masks)
            centroids = np.sort(kmeans_1d(weights[0][masks[0]], 2**bits).centroids)
            nearest = np.full(masks[0].shape, -1)
            nearest[masks[0]] = assign_to_centroids(weights[0][masks[0]], centroids)
            feedback = assign_with_error_feedback(p, weights, masks, centroids)
            assert p.error(dequantize(feedback, centroids)) < p.error(dequantize([nearest], centroids))


def weighted_problem(seed: int, blocks: int = 1, **kwargs):
    """:func:`make_problem` with random positive column weights (one column almost free)."""
    plain = make_problem(seed, blocks=blocks, **kwargs)
    rng = np.random.default_rng(seed + 17)
    weights = []
    for t in plain.targets:
        w = rng.uniform(0.2, 3.0, size=t.shape[1])
        w[rng.integers(t.shape[1])] = 1e-3
        weights.append(w)
    return LayerProblem(plain.grams, plain.targets, damping=plain.damping, column_weights=weights), plain


class TestColumnWeights:
    def test_error_is_the_column_weighted_quadratic_and_output_error_is_not(self):
        p, plain = weighted_problem(20)
        w = [np.zeros_like(p.targets[0])]
        d = w[0] - p.targets[0]
        per_column = np.einsum("jn,jk,kn->n", d, p.hessians[0], d)
        assert p.error(w) == pytest.approx(float(per_column @ p.column_weights[0]), rel=1e-12)
        assert p.output_error(w) == pytest.approx(plain.output_error(w), rel=1e-12)
        assert p.relative_error(w) == pytest.approx(1.0)

    def test_unit_weights_change_nothing(self):
        plain = make_problem(21, k=16, n=9)
        ones = LayerProblem(plain.grams, plain.targets, damping=plain.damping, column_weights=[np.ones(9)])
        a = fit_layer(plain, sparsity=0.6, bits=3, seed=1)
        b = fit_layer(ones, sparsity=0.6, bits=3, seed=1)
        assert a.criterion == b.criterion
        np.testing.assert_array_equal(a.masks[0], b.masks[0])
        np.testing.assert_allclose(a.weights[0], b.weights[0], rtol=1e-9, atol=1e-12)

    def test_scores_follow_the_weighted_objective(self):
        p, plain = weighted_problem(22)
        s = p.column_weights[0][None, :]
        np.testing.assert_allclose(pruning_scores(p, "magnitude")[0], pruning_scores(plain, "magnitude")[0])
        np.testing.assert_allclose(pruning_scores(p, "activation")[0], pruning_scores(plain, "activation")[0] * np.sqrt(s))
        np.testing.assert_allclose(pruning_scores(p, "obs")[0], pruning_scores(plain, "obs")[0] * s)
        # a column whose error does not matter is pruned first by OBS
        weights = p.column_weights[0].copy()
        weights[3] = 0.0
        free = LayerProblem(p.grams, p.targets, column_weights=[weights])
        masks = select_mask(free, p.targets[0].shape[0] / p.n_weights, "obs")
        assert not np.any(masks[0][:, 3]) and np.all(np.delete(masks[0], 3, axis=1))

    def test_weighted_pruning_path_refits_exactly(self):
        p, _ = weighted_problem(23, k=20, n=9)
        for masks, weights in pruning_path(p, [0.5, 0.8]):
            # per column, the weighted and the plain minimiser for a mask coincide
            np.testing.assert_allclose(weights[0], refit_weights(p, masks)[0], atol=1e-9)

    def test_weighted_centroid_refit_is_the_least_squares_solution(self):
        p, _ = weighted_problem(24)
        k = 4
        codes = random_codes(p, k, 24)
        new = refit_centroids(p, codes, np.zeros(k))
        lower = np.linalg.cholesky(p.hessians[0])
        scale = np.sqrt(p.column_weights[0])[None, :]
        design = np.stack([(lower.T @ (codes[0] == c) * scale).ravel() for c in range(k)], axis=1)
        target = (lower.T @ p.targets[0] * scale).ravel()
        expected = np.linalg.lstsq(design, target, rcond=None)[0]
        np.testing.assert_allclose(new, expected, rtol=1e-7, atol=1e-9)

    @pytest.mark.parametrize("shape,k,density,onehot", [((12, 5), 8, 0.7, True), ((12, 5), 8, 0.7, False),
                                                         ((30, 40), 3, 0.1, True), ((30, 40), 3, 1.0, False)])
    def test_every_centroid_system_path_is_weighted(self, monkeypatch, shape, k, density, onehot):
        from onnx_dc.calibration import sharing_fit as refit

        p, _ = weighted_problem(25, k=shape[0], n=shape[1])
        codes = random_codes(p, k, 25, density)[0]
        if not onehot:
            monkeypatch.setattr(refit, "_ONEHOT_MAX_ELEMENTS", 0)
        s = p.column_weights[0]
        system, rhs = refit._centroid_system(p.hessians[0], p.targets[0], codes, k, s)
        expected = np.zeros((k, k))
        for c in range(k):
            for d in range(k):
                expected[c, d] = np.sum((codes == c) * (p.hessians[0] @ (codes == d)) * s[None, :])
        np.testing.assert_allclose(system, expected, rtol=1e-9, atol=1e-12)
        ht = p.hessians[0] @ p.targets[0] * s[None, :]
        np.testing.assert_allclose(rhs, [np.sum(ht[codes == c]) for c in range(k)], rtol=1e-9, atol=1e-12)

    @settings(max_examples=30, deadline=None)
    @given(seed=seeds, k=st.integers(1, 8), sparsity=st.floats(0.0, 0.9))
    def test_weighted_quantization_never_increases_the_weighted_error(self, seed, k, sparsity):
        p, _ = weighted_problem(seed % 983, blocks=1 + seed % 2)
        masks = select_mask(p, sparsity, "activation")
        weights = refit_weights(p, masks)
        start = quantize_layer(p, weights, masks, k, refit=False, seed=seed)
        fitted = quantize_layer(p, weights, masks, k, rounds=5, seed=seed)
        assert fitted.error <= start.error * (1 + 1e-9) + 1e-9
        assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(fitted.history, fitted.history[1:]))
        assert fitted.error == pytest.approx(p.error(fitted.weights), rel=1e-9, abs=1e-9)

    def test_rejects_bad_column_weights(self):
        plain = make_problem(26)
        for bad in ([np.ones(6)], [-np.ones(7)], [np.full(7, np.inf)], [np.ones(7), np.ones(7)]):
            with pytest.raises(InvalidTensorError):
                LayerProblem(plain.grams, plain.targets, column_weights=bad)
