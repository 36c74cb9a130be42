import math

import pytest
import torch

from hf_distill.models.standardization import FeatureStandardizer, ema_weight, global_moments


def test_global_moments_match_direct_computation():
    x = torch.randn(6, 10, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5, 10.0]) + 4.0
    mean, std = global_moments(x)
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(mean.double(), flat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), flat.std(0, unbiased=False), rtol=1e-4, atol=1e-4)


def test_ema_weight_schedule():
    assert ema_weight("unic", 0, 100) == pytest.approx(1.0)
    assert ema_weight("unic", 100, 100) == pytest.approx(0.001)
    assert ema_weight("unic", 50, 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert ema_weight("dune", 37, 100, momentum=0.1) == 0.1


def test_unic_mode_uses_previous_statistics_then_updates():
    standardizer = FeatureStandardizer(3, "unic").train()
    first = torch.randn(64, 3) * 5 + 2
    out = standardizer(first, ema_weight=1.0)
    # previous statistics are the init (0, 1): the first batch passes through (up to the 1e-6 epsilon)
    torch.testing.assert_close(out, first / (1 + 1e-6))
    mean, std = first.mean(0), first.std(0, unbiased=False)
    torch.testing.assert_close(standardizer.mean, mean)
    torch.testing.assert_close(standardizer.std, std, rtol=1e-4, atol=1e-4)
    second = torch.randn(64, 3) * 5 + 2
    out = standardizer(second, ema_weight=0.5)
    torch.testing.assert_close(out, (second - mean) / (std + 1e-6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standardizer.mean, 0.5 * mean + 0.5 * second.mean(0))


def test_dune_mode_uses_batch_statistics_in_training_and_ema_at_eval():
    standardizer = FeatureStandardizer(4, "dune").train()
    x = torch.randn(128, 4) * 3 - 1
    out = standardizer(x, ema_weight=0.1)
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardizer.mean, 0.1 * x.mean(0))
    # eval: frozen EMA statistics, no update
    before = standardizer.mean.clone()
    out_eval = standardizer(x)
    torch.testing.assert_close(out_eval, (x - before) / standardizer.std.clamp_min(1e-3))
    assert torch.equal(standardizer.mean, before)


def test_dune_mode_clamps_tiny_std():
    standardizer = FeatureStandardizer(2, "dune")
    constant = torch.ones(10, 2)
    out = standardizer(constant, ema_weight=0.1)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_patch_statistics_are_over_batch_and_tokens():
    standardizer = FeatureStandardizer(8, "dune")
    patches = torch.randn(4, 16, 8) + torch.arange(16.0).view(1, 16, 1)
    standardizer(patches, ema_weight=1.0)
    torch.testing.assert_close(standardizer.mean, patches.reshape(-1, 8).mean(0))


def test_standardizer_buffers_are_in_state_dict():
    state = FeatureStandardizer(5).state_dict()
    assert set(state) == {"mean", "std"}
    assert not math.isnan(state["std"].sum().item())


def _moments_worker(rank, world_size, port, chunks, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    standardizer = FeatureStandardizer(chunks[rank].shape[-1], "unic")
    standardizer(chunks[rank], ema_weight=1.0)  # EMA weight 1: the buffers become the batch statistics
    results[rank] = (standardizer.mean.clone(), standardizer.std.clone())
    dist.destroy_process_group()


@pytest.mark.distributed
def test_statistics_are_over_the_global_batch_across_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.manual_seed(0)
    chunks = [torch.randn(8, 6, 4) + 3.0, torch.randn(5, 6, 4) * 4.0 - 2.0]  # ranks with different data and sizes
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_moments_worker, args=(2, port, chunks, results), nprocs=2, join=True)
    flat = torch.cat([chunk.reshape(-1, 4) for chunk in chunks]).double()
    for rank in (0, 1):
        mean, std = results[rank]
        torch.testing.assert_close(mean.double(), flat.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std.double(), flat.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
