"""PHI-S standardization against float64 numpy: Hadamard matrices, the transform, its warm-up, freezing, invalid rows,
state-dict round trip, padding of widths without a Hadamard matrix, and the global batch over two processes."""

import numpy as np
import pytest
import torch

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.models.phi_s import PhiSStandardizer, hadamard_matrix, hadamard_size

from ..conftest import tiny_vit_config
from ..process_group import run_in_process_group


def correlated_features(rows: int, dim: int, seed: int = 0, offset: float = 5.0) -> torch.Tensor:
    """Rows with a strongly anisotropic, correlated distribution (eigenvalues spread over 3 decades) and an offset."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = np.logspace(1, -2, dim)
    data = rng.standard_normal((rows, dim)) * np.sqrt(spectrum) @ basis.T + offset * rng.standard_normal(dim)
    return torch.from_numpy(data).float()


def numpy_pca(data: np.ndarray):
    """Mean, eigenvalues (descending) and eigenvectors (columns) of the unbiased covariance, float64."""
    mean = data.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data, rowvar=False, ddof=1))
    return mean, eigenvalues[::-1], eigenvectors[:, ::-1]


@pytest.mark.parametrize("size", [1, 2, 4, 12, 20, 24, 36, 48, 384, 1152, 1280])
def test_hadamard_matrices_are_normalized_and_orthogonal(size):
    matrix = hadamard_matrix(size).numpy()
    np.testing.assert_allclose(np.abs(matrix), 1 / np.sqrt(size), rtol=1e-12)  # every entry +-1/sqrt(n)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(size), atol=1e-10)


def test_widths_without_a_construction_are_padded_to_the_next_one():
    assert [hadamard_size(d) for d in (3, 6, 10, 12, 384, 768, 1024, 1152, 1280)] == [
        4, 8, 12, 12, 384, 768, 1024, 1152, 1280,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="next order with one is 12"):
        hadamard_matrix(10)


def test_frozen_transform_is_phi_s_of_the_float64_statistics():
    """Two warm-up batches (statistics accumulated across them), then frozen: mean, alpha and the rotation equal
    the float64 PCA of the concatenated rows; the result has unit variance in every dimension with the spectrum only
    rescaled (isotropic standardization, not whitening), and the transform is alpha times an orthogonal map."""
    dim = 12
    batches = [correlated_features(300, dim, seed=0), correlated_features(200, dim, seed=0)[:, :] * 1.1]
    standardizer = PhiSStandardizer(dim, warmup_steps=2)
    for batch in batches:
        standardizer(batch, ema_weight=1.0)
    assert standardizer.is_frozen and int(standardizer.num_updates) == 2

    data = torch.cat(batches).double().numpy()
    mean, eigenvalues, eigenvectors = numpy_pca(data)
    alpha = 1 / np.sqrt(eigenvalues.mean())
    np.testing.assert_allclose(standardizer.mean.double().numpy(), mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(standardizer.scale), alpha, rtol=1e-5)
    transform = standardizer.transform.double().numpy()
    np.testing.assert_allclose(transform.T @ transform, alpha**2 * np.eye(dim), atol=1e-5 * alpha**2)
    # transform = alpha H U^T: T U / alpha is a normalized Hadamard matrix (any signs of the eigenvectors)
    np.testing.assert_allclose(np.abs(transform @ eigenvectors / alpha), 1 / np.sqrt(dim), atol=2e-4)

    out = standardizer(torch.from_numpy(data).float()).double().numpy()  # evaluation: the frozen transform
    expected = (data - mean) @ eigenvectors @ (transform @ eigenvectors).T  # alpha H U^T (x - mu), U from numpy
    np.testing.assert_allclose(out, expected, atol=1e-4)
    covariance = np.cov(out, rowvar=False, ddof=1)
    np.testing.assert_allclose(np.diag(covariance), np.ones(dim), rtol=1e-4)  # every dimension: variance 1
    np.testing.assert_allclose(np.linalg.eigvalsh(covariance)[::-1], eigenvalues * alpha**2, rtol=1e-3, atol=1e-6)

    matrix, offset = standardizer.inverse_affine()  # x = A x' + c recovers the features
    np.testing.assert_allclose(out @ matrix.numpy().T + offset.numpy(), data, atol=1e-4)

    frozen = {key: value.clone() for key, value in standardizer.state_dict().items()}
    standardizer(correlated_features(50, dim, seed=3) * 7, ema_weight=1.0)  # after the warm-up: nothing changes
    for key, value in standardizer.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_warm_up_centres_and_scales_isotropically():
    dim = 8
    batch = correlated_features(100, dim, seed=1)
    standardizer = PhiSStandardizer(dim, warmup_steps=3)
    out = standardizer(batch, ema_weight=1.0).double().numpy()
    assert not standardizer.is_frozen
    data = batch.double().numpy()
    variances = data.var(0, ddof=1)
    expected = (data - data.mean(0)) / np.sqrt(variances.mean())  # one scale for all dimensions, no rotation
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_invalid_rows_are_left_out_and_zeroed():
    dim = 4
    tokens = correlated_features(5 * 6, dim, seed=2).view(5, 6, dim)
    valid = torch.tensor([True, False, True, True, False])
    poisoned = tokens.clone()
    poisoned[1] = float("nan")
    poisoned[4] = 1e30
    standardizer, reference = PhiSStandardizer(dim, 1), PhiSStandardizer(dim, 1)
    out = standardizer(poisoned, ema_weight=1.0, valid=valid)
    reference(tokens[valid], ema_weight=1.0)
    assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    for name in ("mean", "transform", "scale", "stat_count"):
        torch.testing.assert_close(getattr(standardizer, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
    assert float(standardizer.stat_count) == 3 * 6  # patch statistics over rows x tokens


def test_padded_width_gives_unit_variance_and_inverts_exactly():
    dim = 10  # no Hadamard matrix of order 10: padded to 12
    data = correlated_features(400, dim, seed=4)
    standardizer = PhiSStandardizer(dim, warmup_steps=1)
    out = standardizer(data, ema_weight=1.0).double().numpy()
    assert out.shape == (400, 12)
    np.testing.assert_allclose(np.diag(np.cov(out, rowvar=False, ddof=1)), np.ones(12), rtol=1e-4)
    matrix, offset = standardizer.inverse_affine()
    np.testing.assert_allclose(out @ matrix.numpy().T + offset.numpy(), data.double().numpy(), atol=1e-4)


def test_state_dict_round_trip_restores_the_frozen_transform():
    dim = 6
    standardizer = PhiSStandardizer(dim, warmup_steps=1)
    standardizer(correlated_features(64, dim), ema_weight=1.0)
    restored = PhiSStandardizer(dim, warmup_steps=1)
    restored(correlated_features(64, dim, seed=9), ema_weight=1.0)  # its own, different, frozen transform
    restored.load_state_dict(standardizer.state_dict())
    assert restored.is_frozen
    probe = correlated_features(16, dim, seed=5)
    torch.testing.assert_close(restored(probe, ema_weight=1.0), standardizer(probe))  # not re-estimated


def test_student_heads_predict_the_padded_width_and_checkpoints_keep_phi_s(tmp_path):
    teachers = [{"name": "a", "summary_dim": 10, "patch_dim": 12}]
    config = UnicStudentConfig(
        backbone_config=tiny_vit_config(), teachers=teachers, standardization="phi-s", standardization_warmup_steps=1
    )
    student = UnicStudentModel(config)
    out = student(torch.randn(2, 3, 32, 32))
    assert out.cls_predictions[0].shape == (2, 12) and out.patch_predictions[0].shape == (2, 16, 12)
    student.cls_standardizers["a"](correlated_features(32, 10), ema_weight=1.0)
    student.save_pretrained(tmp_path)
    loaded = UnicStudentModel.from_pretrained(tmp_path)
    assert loaded.cls_standardizers["a"].is_frozen and not loaded.patch_standardizers["a"].is_frozen
    torch.testing.assert_close(loaded.cls_standardizers["a"].transform, student.cls_standardizers["a"].transform)
    with pytest.raises(ValueError, match="standardization_warmup_steps must be >= 1"):
        UnicStudentConfig(standardization="phi-s", standardization_warmup_steps=0)


def _phi_s_state(rank, chunks):
    standardizer = PhiSStandardizer(chunks[rank].shape[-1], warmup_steps=1)
    standardizer(chunks[rank], ema_weight=1.0)
    return {key: value.clone() for key, value in standardizer.state_dict().items()}


@pytest.mark.distributed
def test_statistics_are_over_the_global_batch_across_processes():
    data = correlated_features(90, 8, seed=6)
    chunks = [data[:60], data[60:] + 0.5]  # different sizes and distributions per process
    results = run_in_process_group(_phi_s_state, chunks)
    single = PhiSStandardizer(8, warmup_steps=1)
    single(torch.cat(chunks), ema_weight=1.0)
    for rank in (0, 1):
        for key, value in single.state_dict().items():
            torch.testing.assert_close(results[rank][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_full_precision_under_the_students_bf16_autocast():
    data = correlated_features(200, 12, seed=7)
    reference, autocast = PhiSStandardizer(12, warmup_steps=1), PhiSStandardizer(12, warmup_steps=1)
    expected = reference(data, ema_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = autocast(data, ema_weight=1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(autocast.transform, reference.transform, rtol=1e-6, atol=1e-6)
