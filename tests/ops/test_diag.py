"""Routing diagnostics (docs/method.md §6): expert load, co-selection counts, dead experts, MaxVio,
combination usage and allocation by key — C against the float64 twins, hand-built masks
with known answers, and bad input."""
import math

import numpy as np
import pytest

from racedit import ops, ref


def mask_from_pairs(E, pairs):
    """One token per entry of `pairs`, selecting exactly those experts."""
    mask = np.zeros((len(pairs), E), bool)
    for t, sel in enumerate(pairs):
        mask[t, list(sel)] = True
    return mask


def random_masks():
    rng = np.random.default_rng(0)
    out = []
    for shape in [(1, 1), (5, 1), (7, 2), (9, 5), (2, 11, 7), (40, 16), (3, 4, 33)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            out.append(rng.random(shape) < p)
    return out


@pytest.mark.parametrize("mask", random_masks(), ids=lambda m: f"{m.shape}-{m.mean():.2f}")
def test_diagnostics_vs_twin(mask):
    np.testing.assert_array_equal(ops.expert_load(mask), ref.expert_load(mask))
    np.testing.assert_array_equal(ops.coselect_counts(mask), ref.coselect_counts(mask))
    assert ops.expert_load(mask).dtype == np.int64
    assert ops.dead_experts(mask) == ref.dead_experts(mask)
    assert ops.max_violation(mask) == pytest.approx(ref.max_violation(mask), rel=1e-12)
    for cov in (0.05, 0.5, 0.95, 1.0):
        assert ops.combination_usage(mask, cov) == pytest.approx(
            ref.combination_usage(mask, cov), rel=1e-12)


def test_max_violation_known_answers():
    E = 4
    balanced = mask_from_pairs(E, [(0, 1), (2, 3), (0, 2), (1, 3)])
    assert ops.max_violation(balanced) == 0.0
    # loads (3, 1, 0, 0): mean 1, max 3 -> MaxVio 2
    unbalanced = mask_from_pairs(E, [(0,), (0, 1), (0,)])
    np.testing.assert_array_equal(ops.expert_load(unbalanced), [3, 1, 0, 0])
    assert ops.max_violation(unbalanced) == pytest.approx(2.0)
    assert ops.dead_experts(unbalanced) == 2
    # loads (2, 1, 1): mean 4/3, MaxVio (2 - 4/3) / (4/3) = 0.5
    assert ops.max_violation(mask_from_pairs(3, [(0, 1), (0, 2)])) == pytest.approx(0.5)
    # nothing selected: defined as 0, every expert dead
    assert ops.max_violation(np.zeros((3, 5), bool)) == 0.0
    assert ops.dead_experts(np.zeros((3, 5), bool)) == 5


@pytest.mark.parametrize("E", [4, 5, 16, 21])
def test_combination_usage_uniform(E):
    # every unordered pair used by the same number of tokens: the bins before the one
    # whose cumulative share reaches the coverage
    pairs = [(i, j) for i in range(E) for j in range(i + 1, E)] * 2
    npairs = E * (E - 1) // 2
    mask = mask_from_pairs(E, pairs)
    got = ops.combination_usage(mask)
    assert got == pytest.approx((math.ceil(0.95 * npairs) - 1) / npairs, abs=1e-15)
    if E == 16:                       # C(16,2) = 120: the 114th bin reaches exactly 95 %
        assert got == pytest.approx(113 / 120, abs=1e-15)
    assert ops.combination_usage(mask, 1.0) == pytest.approx((npairs - 1) / npairs)
    assert ops.combination_usage(mask, 0.5) == pytest.approx(
        (math.ceil(0.5 * npairs) - 1) / npairs)


@pytest.mark.parametrize("E", [2, 3, 8, 32])
def test_combination_usage_one_pair(E):
    # one combination holds all the pair mass: no combination stays below 95 %
    mask = mask_from_pairs(E, [(0, E - 1)] * 7 + [(1,)] * 3)
    assert ops.combination_usage(mask) == 0.0
    assert ref.combination_usage(mask) == 0.0


def test_combination_usage_dominant_pair_edge():
    # E = 3, pair counts (0,1): c, (1,2): 100 - c. At c = 95 the first bin alone reaches
    # 95 % (usage 0); at c = 94 it stays below and the second reaches it (usage 1/3).
    for c, want in ((95, 0.0), (94, 1 / 3), (50, 1 / 3)):
        mask = mask_from_pairs(3, [(0, 1)] * c + [(1, 2)] * (100 - c))
        assert ops.combination_usage(mask) == pytest.approx(want, abs=1e-15)
        assert ref.combination_usage(mask) == pytest.approx(want, abs=1e-15)


def test_combination_usage_hand_built():
    # pair counts (0,1):5 (0,2):3 (1,2):1 (2,3):1 over C(4,2) = 6 bins, total 10;
    # cumulative 5, 8, 9, 10: counted are the bins strictly below coverage * 10
    E = 4
    mask = mask_from_pairs(E, [(0, 1)] * 4 + [(0, 2)] * 2 + [(0, 1, 2)] + [(2, 3)])
    C = ops.coselect_counts(mask)
    assert (C[0, 1], C[0, 2], C[1, 2], C[2, 3], C[0, 3], C[1, 3]) == (5, 3, 1, 1, 0, 0)
    np.testing.assert_array_equal(C, C.T)
    np.testing.assert_array_equal(np.diag(C), ops.expert_load(mask))
    assert ops.combination_usage(mask, 0.5) == 0.0                     # 5 reaches 5
    assert ops.combination_usage(mask, 0.51) == pytest.approx(1 / 6)   # 5 < 5.1
    assert ops.combination_usage(mask, 0.8) == pytest.approx(1 / 6)    # 8 reaches 8
    assert ops.combination_usage(mask, 0.9) == pytest.approx(2 / 6)    # 5, 8 < 9
    assert ops.combination_usage(mask, 0.95) == pytest.approx(3 / 6)   # 5, 8, 9 < 9.5
    assert ops.combination_usage(mask, 1.0) == pytest.approx(3 / 6)


def test_combination_usage_degenerate():
    assert ops.combination_usage(np.ones((5, 1), bool)) == 0.0            # E < 2
    assert ops.combination_usage(np.eye(4, dtype=bool)) == 0.0            # no token has 2
    assert ops.combination_usage(np.zeros((0, 4), bool)) == 0.0           # no tokens


def test_diagnostics_3d_equals_2d():
    rng = np.random.default_rng(1)
    mask = rng.random((3, 7, 6)) < 0.3
    flat = mask.reshape(21, 6)
    np.testing.assert_array_equal(ops.expert_load(mask), ops.expert_load(flat))
    assert ops.combination_usage(mask) == ops.combination_usage(flat)
    assert ops.max_violation(mask) == ops.max_violation(flat)


def test_allocation_by_key_hand_built():
    B, L, E = 4, 2, 3
    mask = np.zeros((B, L, E), bool)
    mask[0, 0, :2] = True                # sample 0: 2 pairs / 2 tokens = 1.0
    mask[1, :, :] = True                 # sample 1: 6 / 2 = 3.0
    mask[3, 1, 0] = True                 # sample 3: 1 / 2 = 0.5; sample 2: 0
    keys = np.array([1, 1, 3, 3])
    mean, count = ops.allocation_by_key(mask, keys, 5)
    assert mean.dtype == np.float64 and count.dtype == np.int64
    np.testing.assert_array_equal(count, [0, 2, 0, 2, 0])
    np.testing.assert_allclose(mean[[1, 3]], [2.0, 0.25])
    assert np.isnan(mean[[0, 2, 4]]).all()


def test_allocation_by_key_vs_twin():
    rng = np.random.default_rng(2)
    mask = rng.random((9, 5, 7)) < rng.random((9, 1, 1))
    keys = rng.integers(0, 6, 9).astype(np.int32)
    mean, count = ops.allocation_by_key(mask, keys, 6)
    rmean, rcount = ref.allocation_by_key(mask, keys, 6)
    np.testing.assert_array_equal(count, rcount)
    np.testing.assert_allclose(mean, rmean, rtol=1e-12)   # NaN in the same places


# ---- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["expert_load", "coselect_counts", "dead_experts",
                                  "max_violation", "combination_usage"])
def test_mask_bad_input(name):
    f = getattr(ops, name)
    with pytest.raises(TypeError, match="mask: expected dtype numpy.bool"):
        f(np.zeros((3, 4), np.uint8))
    with pytest.raises(TypeError, match="mask: expected a numpy.ndarray"):
        f([[True, False]])
    with pytest.raises(ValueError, match=r"mask: expected an \(N, E\) or \(B, L, E\)"):
        f(np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"mask: expected an \(N, E\) or \(B, L, E\)"):
        f(np.zeros((1, 2, 3, 4), bool))


def test_max_violation_no_experts():
    with pytest.raises(ValueError, match="E >= 1"):
        ops.max_violation(np.zeros((3, 0), bool))


@pytest.mark.parametrize("coverage", [0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_combination_usage_bad_coverage(coverage):
    with pytest.raises(ValueError, match="coverage: expected a value in \\(0, 1\\]"):
        ops.combination_usage(np.ones((2, 3), bool), coverage)


@pytest.mark.parametrize("coverage", ["0.9", None, True])
def test_combination_usage_coverage_type(coverage):
    with pytest.raises(TypeError, match="coverage: expected a real number"):
        ops.combination_usage(np.ones((2, 3), bool), coverage)


def test_allocation_by_key_bad_input():
    mask = np.zeros((3, 2, 4), bool)
    keys = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"keys: expected values in \[0, 3\), got 3 at index 1"):
        ops.allocation_by_key(mask, np.array([0, 3, 1]), 3)
    with pytest.raises(ValueError, match=r"keys: expected values in \[0, 3\), got -1"):
        ops.allocation_by_key(mask, np.array([0, -1, 1]), 3)
    with pytest.raises(ValueError, match="keys: expected shape"):
        ops.allocation_by_key(mask, np.array([0, 1]), 3)
    with pytest.raises(TypeError, match="keys: expected dtype"):
        ops.allocation_by_key(mask, keys.astype(np.float64), 3)
    with pytest.raises(TypeError, match="mask: expected dtype numpy.bool"):
        ops.allocation_by_key(mask.astype(np.int8), keys, 3)
    with pytest.raises(ValueError, match="mask: expected a 3-d"):
        ops.allocation_by_key(mask.reshape(6, 4), keys, 3)
    with pytest.raises(ValueError, match="num_buckets: expected an int >= 1, got 0"):
        ops.allocation_by_key(mask, keys, 0)
    with pytest.raises(TypeError, match="num_buckets: expected an int"):
        ops.allocation_by_key(mask, keys, 3.0)
    with pytest.raises(TypeError, match="num_buckets: expected an int"):
        ops.allocation_by_key(mask, keys, True)
