"""The memory memorizes: pairs written into it are read back (function, not only form: each test
fails if the update stops writing, e.g. a zeroed step or a skipped chunk)."""

import pytest
import torch
import torch.nn.functional as F

from components.ops.memory import MemoryModel, init_memory_state, memory_read, memory_update


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def initial(widths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, a, b, generator=g, dtype=torch.float64) / a**0.5 for a, b in zip(widths[:-1], widths[1:])
    )


def gate(n, value):
    return torch.full((1, 1, n), value, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [1, 8])
def test_linear_memory_recalls_orthonormal_keys_exactly(chunk):
    """theta = 1/2 is an exact delta-rule overwrite (the loss has no 1/2): with orthonormal keys
    every pair is stored without disturbing the others, from any initial W_0, also when all the
    gradients of a chunk are taken at its start."""
    d = 8
    keys = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    k = keys.T[None, None]  # (1, 1, 8, 8): rows orthonormal
    v = unit(1, 1, d, d, seed=1)
    state = init_memory_state(initial([d, d]), 1, momentum=False)
    before = memory_read(k, state.weights, MemoryModel())
    assert (before - v).abs().max() > 0.5
    _, state = memory_update(k, k, v, gate(d, 0.5), None, None, state, chunk_size=chunk)
    torch.testing.assert_close(memory_read(k, state.weights, MemoryModel()), v, atol=1e-10, rtol=0)


@pytest.mark.parametrize("depth", [2, 3])
def test_mlp_memory_recall_error_falls_below_1e_3(depth):
    """8 random unit key/value pairs fed 30 times (momentum 0.1, theta 0.2): the deep memory's
    mean squared recall error falls from ~1 to below 1e-3."""
    d, n = 16, 8
    k, v = unit(1, 1, n, d, seed=0), unit(1, 1, n, d, seed=1)
    model = MemoryModel("gelu")
    state = init_memory_state(initial([d] + [64] * (depth - 1) + [d]), 1, momentum=True)
    error = lambda: float((memory_read(k, state.weights, model) - v).pow(2).sum(-1).mean())  # noqa: E731
    start = error()
    for _ in range(30):
        _, state = memory_update(k, k, v, gate(n, 0.2), gate(n, 0.1), None, state, chunk_size=1, model=model)
    assert start > 0.9 and error() < 1e-3, f"recall error {start:.3f} -> {error():.2e}"


def test_a_deep_memory_forgetting_toward_its_prior_keeps_learning_toward_zero_dies():
    """docs/decisions/0006: with the forget gate on, a 2-layer memory cycling through 8 pairs
    fits them when decay pulls toward W_0; decayed toward zero both layers shrink together, the
    gradients with them, and the memory stops learning."""
    d, n, laps = 16, 8, 128
    k, v = unit(1, 1, n, d, seed=0), unit(1, 1, n, d, seed=1)
    w0 = initial([d, 64, d])
    result = {}
    for toward, prior in (("initial", w0), ("zero", None)):
        model = MemoryModel("gelu", prior=prior)
        state = init_memory_state(w0, 1, momentum=True)
        for _ in range(laps):
            _, state = memory_update(
                k, k, v, gate(n, 0.03), gate(n, 0.1), gate(n, 0.007), state, chunk_size=8, model=model
            )
        err = float((memory_read(k, state.weights, model) - v).pow(2).sum(-1).mean())
        result[toward] = (err, float(state.weights[0].norm()))
    assert result["initial"][0] < 0.3, result
    assert result["zero"][0] > 0.9 and result["zero"][1] < 0.1 * result["initial"][1], result


def test_surprise_falls_along_a_sequence_the_memory_learns():
    """chunk_surprise: on 8 pairs repeated, the inner loss of the last chunks is a small fraction
    of the first's; with theta = 0 the memory learns nothing and the curve is flat."""
    from components.ops.memory import chunk_surprise

    d, n = 16, 8
    k, v = unit(1, 1, n, d, seed=0).repeat(1, 1, 16, 1), unit(1, 1, n, d, seed=1).repeat(1, 1, 16, 1)
    model = MemoryModel("gelu")
    for theta, falls in ((0.2, True), (0.0, False)):
        state = init_memory_state(initial([d, 64, d]), 1, momentum=True)
        curve = chunk_surprise(k, v, gate(128, theta), gate(128, 0.1), None, state, chunk_size=8, model=model)[0, 0]
        assert curve.shape == (16,)
        if falls:
            assert curve[-4:].mean() < 0.01 * curve[0], curve
        else:
            torch.testing.assert_close(curve, curve[:1].expand(16))


def test_polynomial_features_let_a_matrix_memory_store_more_pairs_than_its_width():
    """ATLAS Prop. 2: a matrix memory over d-dim keys holds at most d independent pairs; over
    degree-2 polynomial features (D = C(d + 2, 2) = 45 at d = 8) it holds 20 random pairs. Fed
    40 times each, the plain matrix memory cannot fall below its least-squares floor (0.61; it
    ends at 1.26) while the feature-mapped one recalls them (6e-6)."""
    from components.feature_map import PolynomialFeatures

    d, n = 8, 20
    k, v = unit(1, 1, n, d, seed=0), unit(1, 1, n, d, seed=1)
    errors = {}
    for name, phi in (("identity", None), ("polynomial", PolynomialFeatures(d, 2).double())):
        keys = phi(k) if phi is not None else k
        width = keys.shape[-1]
        state = init_memory_state((torch.zeros(1, width, d, dtype=torch.float64),), 1, momentum=False)
        step = 0.5 / keys.pow(2).sum(-1).max()  # normalised LMS: stable for every key
        for _ in range(40):
            _, state = memory_update(keys, keys, v, gate(n, float(step)), None, None, state, chunk_size=1)
        errors[name] = float((memory_read(keys, state.weights, MemoryModel()) - v).pow(2).sum(-1).mean())
    floor = float((k[0, 0] @ torch.linalg.lstsq(k[0, 0], v[0, 0]).solution - v[0, 0]).pow(2).sum(-1).mean())
    assert errors["identity"] > 0.5 * floor > 0.1, errors  # 20 pairs cannot fit in an 8 x 8 matrix
    assert errors["polynomial"] < 0.05 * errors["identity"], errors
