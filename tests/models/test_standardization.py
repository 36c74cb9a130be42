import math

import numpy as np
import pytest
import torch

from hf_distill.models.configuration_unic import UnicStudentConfig
from hf_distill.models.standardization import FeatureStandardizer, ema_weight, global_moments

from ..process_group import run_in_process_group


def _numpy_moments(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy reference: per-dimension mean and unbiased std over all leading dims."""
    flat = features.double().numpy().reshape(-1, features.shape[-1])
    return flat.mean(0), flat.std(0, ddof=1)


def test_global_moments_match_float64_numpy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 5, generator=generator) * torch.tensor([1.0, 2.0, 3.0, 0.5, 10.0]) + 4.0
    mean, std = global_moments(x)
    expected_mean, expected_std = _numpy_moments(x)
    np.testing.assert_allclose(mean.double().numpy(), expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std.double().numpy(), expected_std, rtol=1e-6)


def test_global_moments_std_is_unbiased():
    x = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]])
    mean, std = global_moments(x)
    torch.testing.assert_close(mean, torch.tensor([2.5, 10.0]))
    # by hand: squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, divided by n - 1 = 3
    torch.testing.assert_close(std, torch.tensor([math.sqrt(5 / 3), 0.0]))


@pytest.mark.parametrize("offset", [10.0, 1000.0, 1e4])
@pytest.mark.parametrize("shape", [(8, 768), (16, 49, 96)])
def test_global_moments_exact_on_large_offset_small_spread(offset, shape):
    """Dimensions with a large offset and a small spread (real ViT teachers have them): the one-pass E[x^2] - E[x]^2
    in fp32 gave a std of 0 at offset 10 and ~250x too large at offset 1000."""
    generator = torch.Generator().manual_seed(1)
    x = offset + 0.01 * torch.randn(*shape, generator=generator)
    mean, std = global_moments(x)
    expected_mean, expected_std = _numpy_moments(x)
    assert (expected_std > 1e-3).all()  # the fp32 data itself keeps a spread of ~0.01
    np.testing.assert_allclose(std.double().numpy(), expected_std, rtol=1e-5)
    np.testing.assert_allclose(mean.double().numpy(), expected_mean, rtol=1e-7, atol=1e-6)


def test_next_batch_targets_stay_bounded_after_high_offset_batch():
    generator = torch.Generator().manual_seed(2)
    standardizer = FeatureStandardizer(768, "unic")
    standardizer(10 + 0.01 * torch.randn(8, 768, generator=generator), ema_weight=1.0)
    out = standardizer(10 + 0.01 * torch.randn(8, 768, generator=generator), ema_weight=0.5)
    # both batches come from the same distribution: standardized values are a few units, not |2.7e4|
    assert out.abs().max() < 10


def test_ema_weight_schedule():
    assert ema_weight(0, 100) == pytest.approx(1.0)
    assert ema_weight(100, 100) == pytest.approx(0.001)
    assert ema_weight(50, 100) == pytest.approx(0.001 + 0.999 * 0.5)
    # by hand: 0.001 + 0.999 * 0.5 * (1 + cos(pi / 4))
    assert ema_weight(25, 100) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + 0.7071067811865476))


def test_unic_mode_uses_previous_statistics_then_updates():
    generator = torch.Generator().manual_seed(3)
    standardizer = FeatureStandardizer(3, "unic").train()
    first = torch.randn(64, 3, generator=generator) * 5 + 2
    out = standardizer(first, ema_weight=1.0)
    # previous statistics are the init (0, 1): the first batch passes through (up to the 1e-6 epsilon)
    torch.testing.assert_close(out, first / (1 + 1e-6))
    mean, std = _numpy_moments(first)
    np.testing.assert_allclose(standardizer.mean.double().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(standardizer.std.double().numpy(), std, rtol=1e-6)
    second = torch.randn(64, 3, generator=generator) * 5 + 2
    out = standardizer(second, ema_weight=0.25)
    expected = (second.double().numpy() - mean) / (std + 1e-6)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    mean2, std2 = _numpy_moments(second)
    np.testing.assert_allclose(standardizer.mean.double().numpy(), 0.75 * mean + 0.25 * mean2, rtol=1e-6)
    np.testing.assert_allclose(standardizer.std.double().numpy(), 0.75 * std + 0.25 * std2, rtol=1e-6)


def test_dune_mode_uses_batch_statistics_and_the_cosine_ema():
    generator = torch.Generator().manual_seed(4)
    standardizer = FeatureStandardizer(4, "dune").train()
    ema_mean, ema_std = np.zeros(4), np.ones(4)
    for step in (0, 3, 7):
        x = torch.randn(32, 4, generator=generator) * 3 - 1
        weight = ema_weight(step, 10)
        out = standardizer(x, ema_weight=weight)
        mean, std = _numpy_moments(x)  # current batch, unbiased
        np.testing.assert_allclose(out.double().numpy(), (x.double().numpy() - mean) / std, rtol=1e-5, atol=1e-5)
        ema_mean, ema_std = (1 - weight) * ema_mean + weight * mean, (1 - weight) * ema_std + weight * std
        np.testing.assert_allclose(standardizer.mean.double().numpy(), ema_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(standardizer.std.double().numpy(), ema_std, rtol=1e-5)
    # eval: frozen EMA statistics, no update
    x = torch.randn(8, 4, generator=generator)
    out_eval = standardizer(x)
    np.testing.assert_allclose(out_eval.double().numpy(), (x.double().numpy() - ema_mean) / ema_std, rtol=1e-5)
    np.testing.assert_allclose(standardizer.mean.double().numpy(), ema_mean, rtol=1e-5, atol=1e-6)


def test_dune_mode_clamps_tiny_std():
    standardizer = FeatureStandardizer(2, "dune")
    x = torch.tensor([[1.0, 5.0], [1.0, 5.0 + 2e-5], [1.0, 5.0 - 2e-5]])
    out = standardizer(x, ema_weight=0.1)
    assert torch.isfinite(out).all()
    assert out[:, 0].abs().max() == 0
    # the unbiased std of the second column (~2e-5) is clamped to 1e-3
    expected = (x[:, 1].double().numpy() - x[:, 1].double().numpy().mean()) / 1e-3
    np.testing.assert_allclose(out[:, 1].double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_patch_statistics_are_over_batch_and_tokens():
    standardizer = FeatureStandardizer(8, "dune")
    patches = torch.randn(4, 16, 8) + torch.arange(16.0).view(1, 16, 1)
    standardizer(patches, ema_weight=1.0)
    mean, std = _numpy_moments(patches)
    np.testing.assert_allclose(standardizer.mean.double().numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(standardizer.std.double().numpy(), std, rtol=1e-6)


@pytest.mark.parametrize("mode", ["unic", "dune"])
def test_invalid_rows_are_left_out_and_zeroed(mode):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 3, generator=generator) * 2 + 100
    x[1] = float("nan")
    x[4, 2] = float("inf")
    valid = torch.tensor([True, False, True, True, False, True])
    mean, std = global_moments(x, valid)
    expected_mean, expected_std = _numpy_moments(x[valid])
    np.testing.assert_allclose(mean.double().numpy(), expected_mean, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(std.double().numpy(), expected_std, rtol=1e-5)

    standardizer = FeatureStandardizer(3, mode)
    out = standardizer(x, ema_weight=1.0, valid=valid)
    assert torch.isfinite(out).all()
    assert (out[~valid] == 0).all()
    np.testing.assert_allclose(standardizer.mean.double().numpy(), expected_mean, rtol=1e-7)
    np.testing.assert_allclose(standardizer.std.double().numpy(), expected_std, rtol=1e-5)
    # evaluation also zeroes invalid rows
    assert (standardizer(x, valid=valid)[~valid] == 0).all()


@pytest.mark.parametrize("flags", [[False, False, False], [False, True, False]])
def test_too_few_valid_rows_leave_the_ema_unchanged(flags):
    x = torch.tensor([[float("nan"), 2.0], [3.0, 4.0], [5.0, float("inf")]])
    valid = torch.tensor(flags)
    for mode in ("unic", "dune"):
        standardizer = FeatureStandardizer(2, mode)
        standardizer.mean.copy_(torch.tensor([1.0, 3.0]))
        standardizer.std.copy_(torch.tensor([2.0, 0.5]))
        out = standardizer(x, ema_weight=0.5, valid=valid)
        torch.testing.assert_close(standardizer.mean, torch.tensor([1.0, 3.0]))
        torch.testing.assert_close(standardizer.std, torch.tensor([2.0, 0.5]))
        assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    # dune mode with a single valid row: normalized with the EMA statistics
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    standardizer = FeatureStandardizer(2, "dune")
    standardizer.mean.copy_(torch.tensor([1.0, 3.0]))
    standardizer.std.copy_(torch.tensor([2.0, 0.5]))
    out = standardizer(x, ema_weight=0.5, valid=torch.tensor([False, True]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))


def test_valid_must_be_a_bool_row_mask():
    standardizer = FeatureStandardizer(2)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        standardizer(torch.zeros(3, 2), ema_weight=0.5, valid=torch.ones(3))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        global_moments(torch.zeros(3, 4, 2), torch.ones(3, 4, dtype=torch.bool))


def test_old_configs_with_standardization_momentum_still_load():
    config = UnicStudentConfig(standardization="dune", standardization_momentum=0.1)
    assert config.standardization == "dune"


def test_standardizer_buffers_are_in_state_dict():
    state = FeatureStandardizer(5).state_dict()
    assert set(state) == {"mean", "std"}
    assert not math.isnan(state["std"].sum().item())


def _dune_moments(rank, chunks, masks):
    standardizer = FeatureStandardizer(chunks[rank].shape[-1], "dune")
    out = standardizer(chunks[rank], ema_weight=1.0, valid=masks[rank])  # EMA weight 1: buffers = batch statistics
    return standardizer.mean.clone(), standardizer.std.clone(), out


@pytest.mark.distributed
def test_statistics_are_over_the_global_batch_across_processes():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0.0, 10.0, 1000.0, 1e4])
    spreads = torch.tensor([1.0, 0.01, 0.01, 0.01])
    # ranks with different data, different sizes and invalid (non-finite) rows
    chunks = [
        torch.randn(8, 6, 4, generator=generator) * spreads + offsets,
        torch.randn(5, 6, 4, generator=generator) * spreads * 3 + offsets + 0.02,
    ]
    chunks[1][2] = float("nan")
    masks = [torch.ones(8, dtype=torch.bool), torch.tensor([True, True, False, True, True])]
    results = run_in_process_group(_dune_moments, chunks, masks)

    concatenated = torch.cat([chunk[mask] for chunk, mask in zip(chunks, masks)])
    single_mean, single_std = global_moments(concatenated)
    expected_mean, expected_std = _numpy_moments(concatenated)
    for rank in (0, 1):
        mean, std, out = results[rank]
        torch.testing.assert_close(mean, single_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(std, single_std, rtol=1e-6, atol=0)
        np.testing.assert_allclose(mean.double().numpy(), expected_mean, rtol=1e-7, atol=1e-6)
        np.testing.assert_allclose(std.double().numpy(), expected_std, rtol=1e-5)
        assert torch.isfinite(out).all() and (out[~masks[rank]] == 0).all()
