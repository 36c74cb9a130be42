"""Teachers and the UNIC student sharded with FSDP2 (`fully_shard`) on CPU: two processes with gloo, started once
(torch.multiprocessing) for the whole module; the references are computed here, unsharded, in one process.

- sharded teachers (a ViT, a DINOv2, a plain torch module) give the outputs of the unsharded ones, and run under
  `torch.no_grad` (not inference mode) without autograd records;
- the standardization statistics computed with sharded teachers are those of the global batch (float64 numpy over
  both processes' data, an invalid row left out);
- a UNIC step whose student is sharded gives the loss and gradients of the unsharded step on the concatenated batch.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_distill.distributed_checks import is_sharded, shard_with_fsdp2
from hf_distill.models.standardization import FeatureStandardizer
from hf_distill.models.teacher_loading import frozen_forward_context, teacher_outputs

from ..unic_steps import IMAGE, MEAN, STD, build_student, build_teachers, unic_step

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
BATCH = 4  # per process


def process_pixels(rank: int) -> torch.Tensor:
    """This process's share of the global batch (student-normalized pixels)."""
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.rand(BATCH, 3, IMAGE, IMAGE, generator=generator) - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        record = {}
        teachers = [shard_with_fsdp2(teacher) for teacher in build_teachers()]
        record["sharded"] = [is_sharded(teacher) for teacher in teachers]
        record["context"] = type(frozen_forward_context(teachers)).__name__
        pixels = process_pixels(rank)
        outputs = teacher_outputs(teachers, pixels, MEAN, STD, grid=(4, 4))
        record["outputs"] = [(summary.clone(), patch.clone()) for summary, patch in outputs]
        record["requires_grad"] = any(t.requires_grad for pair in outputs for t in pair)
        record["inference"] = any(t.is_inference() for pair in outputs for t in pair)

        # standardization statistics with an invalid (NaN) row on the second process
        stats = []
        for summary, patch in outputs:
            valid = torch.ones(BATCH, dtype=torch.bool)
            if rank == 1:
                valid[0] = False
                summary, patch = summary.clone(), patch.clone()
                summary[0], patch[0] = float("nan"), float("nan")
            for features in (summary, patch):
                standardizer = FeatureStandardizer(features.shape[-1], mode="dune")
                standardizer(features, ema_weight=1.0, valid=valid)  # weight 1: the EMA becomes the batch stats
                stats.append((standardizer.mean.clone(), standardizer.std.clone()))
        record["stats"] = stats

        # one UNIC step with the student sharded too
        student = shard_with_fsdp2(build_student(teachers))
        loss = unic_step(student, teachers, pixels)
        loss.backward()
        record["loss"] = loss.detach()
        record["grads"] = {name: p.grad.full_tensor() for name, p in student.named_parameters() if p.grad is not None}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_sharded_teachers_match_unsharded_and_run_under_no_grad(records):
    teachers = build_teachers()
    assert [type(frozen_forward_context(teachers)).__name__] == ["inference_mode"]  # unsharded: the fast path
    for rank, record in enumerate(records):
        assert record["sharded"] == [True, True, True]
        assert record["context"] == "no_grad"
        assert not record["requires_grad"] and not record["inference"]
        reference = teacher_outputs(teachers, process_pixels(rank), MEAN, STD, grid=(4, 4))
        for name, (summary, patch), (ref_summary, ref_patch) in zip(
            ("vit", "dinov2", "convnet"), record["outputs"], reference
        ):
            torch.testing.assert_close(summary, ref_summary, rtol=1e-5, atol=1e-6, msg=f"{name} summary, rank {rank}")
            torch.testing.assert_close(patch, ref_patch, rtol=1e-5, atol=1e-6, msg=f"{name} patches, rank {rank}")


def test_standardization_with_sharded_teachers_uses_the_global_batch(records):
    """float64 numpy over both processes' features; the NaN row of process 1 is left out on both."""
    for index in range(3):
        for kind in range(2):  # summary, patch tokens
            parts = [record["outputs"][index][kind].double().numpy() for record in records]
            parts[1] = parts[1][1:]  # row 0 of process 1 was marked invalid
            rows = np.concatenate([part.reshape(-1, part.shape[-1]) for part in parts])
            for rank, record in enumerate(records):
                mean, std = record["stats"][2 * index + kind]
                np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-5, atol=1e-6, err_msg=f"{index} {rank}")
                np.testing.assert_allclose(std.numpy(), rows.std(0, ddof=1), rtol=1e-5, err_msg=f"{index} {rank}")


def test_sharded_student_step_matches_the_unsharded_step_on_the_global_batch(records):
    teachers = build_teachers()
    student = build_student(teachers)
    pixels = torch.cat([process_pixels(rank) for rank in range(WORLD_SIZE)])
    loss = unic_step(student, teachers, pixels)
    loss.backward()
    # each process's loss is the mean over its images; FSDP2 averages the gradients over processes
    torch.testing.assert_close(
        sum(record["loss"] for record in records) / WORLD_SIZE, loss.detach(), rtol=1e-5, atol=0
    )
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    assert len(grads) > 20 and all(sorted(record["grads"]) == sorted(grads) for record in records)
    for name, grad in grads.items():
        for record in records:
            torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
