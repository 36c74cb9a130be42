import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from hf_distill.data.domain_sampler import DomainBatchSampler

SIZES = [40, 24, 16]  # rows 0-39, 40-63, 64-79
BOUNDS = [0, 40, 64, 80]


def domains_of(batches):
    return [int(np.searchsorted(BOUNDS[1:], batch[0], side="right")) for batch in batches]


@pytest.mark.parametrize("strategy", ["round_robin", "proportional", "balanced", "dynamic"])
def test_every_batch_holds_one_domain(strategy):
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy=strategy, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 and all(len(b) == 8 for b in batches)
    for batch in batches:
        domain = domains_of([batch])[0]
        assert all(BOUNDS[domain] <= row < BOUNDS[domain + 1] for row in batch)
        assert len(set(batch)) == 8


def test_each_domain_reads_a_permutation_then_a_fresh_one():
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy="round_robin", seed=4)
    batches = list(sampler)  # domains 0,1,2,0,1,2,0,1,2,0
    rows = {d: sum((b for b, dom in zip(batches, domains_of(batches)) if dom == d), []) for d in range(3)}
    assert len(rows[0]) == 32 and len(set(rows[0])) == 32  # 4 batches of 40 rows: no repeat
    assert sorted(rows[1]) == list(range(40, 64))  # 3 batches of 24 rows: exactly all of them
    assert sorted(rows[2][:16]) == list(range(64, 80)) and len(set(rows[2][16:])) == 8  # 16 rows, then a new cycle
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches  # deterministic


def test_strategies_frequencies():
    def counts(strategy, epochs=60):
        sampler = DomainBatchSampler(SIZES, batch_size=8, strategy=strategy, seed=0)
        found = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            found += domains_of(list(sampler))
        return np.bincount(found, minlength=3) / len(found)

    assert counts("round_robin", 3).tolist() == pytest.approx([10 / 30, 10 / 30, 10 / 30], abs=0.04)
    assert counts("proportional") == pytest.approx(np.array(SIZES) / 80, abs=0.04)
    assert counts("balanced") == pytest.approx([1 / 3] * 3, abs=0.04)


def test_dynamic_gives_more_batches_to_the_domain_with_higher_loss():
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", update_every=4, seed=0)
    assert domains_of(list(sampler)) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # starts round-robin
    assert sampler.current_weights == pytest.approx([1 / 3] * 3)
    for domain, loss in [(0, 1.0), (1, 4.0), (2, 1.0), (1, torch.tensor(4.0))]:  # floats or tensors
        sampler.record_loss(domain, loss)
        weights = sampler.step()
    assert sampler.steps == 4 and weights == pytest.approx([1 / 6, 4 / 6, 1 / 6])  # mean losses 1, 4, 1
    assert sampler.current_weights == pytest.approx(weights)
    assert sampler.loss_counts.sum().item() == 0  # the window restarts
    found = []
    for epoch in range(1, 30):
        sampler.set_epoch(epoch)
        found += domains_of(list(sampler))
    share = np.bincount(found, minlength=3) / len(found)
    assert share[1] > 0.55 and share[0] < 0.25 and share[2] < 0.25
    # a domain without a batch in the window gets the observed mean scaled by its previous weight / mean weight:
    # domain 2 had 1/6 against a mean of 1/3, so it counts as a mean loss of 2 * 0.5 = 1 next to 2 and 2
    sampler.record_loss(0, 2.0)
    sampler.record_loss(1, 2.0)
    assert sampler.update() == pytest.approx([0.4, 0.4, 0.2])


def test_state_dict_resume_replays_the_same_sequence():
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", update_every=2, seed=3)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(4)]
    sampler.record_loss(2, torch.tensor(5.0))
    sampler.step()
    sampler.record_loss(0, torch.tensor(1.0))
    sampler.step()  # update: applies from batch 4
    rest = list(iterator)
    sampler.record_loss(1, torch.tensor(3.0))  # a window in progress at the checkpoint
    sampler.step()
    state = sampler.state_dict()
    assert state["steps"] == 3 and state["loss_counts"] == [0.0, 1.0, 0.0]

    resumed = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", update_every=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert list(resumed) == first + rest  # Trainer re-iterates the epoch to skip the batches already seen
    assert resumed.current_weights == sampler.current_weights
    for each in (sampler, resumed):  # the restored window and step counter give the same next update
        each.record_loss(2, 2.0)
        assert each.step() is not None
    assert resumed.history == sampler.history
    sampler.set_epoch(1)
    resumed.set_epoch(1)
    assert list(resumed) == list(sampler)
    with pytest.raises(ValueError, match="same settings"):
        DomainBatchSampler(SIZES, batch_size=8, strategy="balanced", seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        DomainBatchSampler(SIZES, batch_size=4, strategy="dynamic", update_every=2, seed=3).load_state_dict(state)
    rank1 = DomainBatchSampler(SIZES, batch_size=4, strategy="dynamic", update_every=2, seed=3, num_replicas=2, rank=1)
    rank1.load_state_dict({**state, "batch_size": 4, "num_replicas": 2})
    assert rank1.loss_counts.sum().item() == 0  # the saved window counts once: on process 0


@pytest.mark.parametrize("strategy", ["round_robin", "proportional", "dynamic"])
def test_rank_aware_sampling_shares_the_domain_and_splits_the_rows(strategy):
    ranks = [DomainBatchSampler(SIZES, 4, strategy, seed=5, num_replicas=2, rank=r) for r in range(2)]
    single = DomainBatchSampler(SIZES, 8, strategy, seed=5)
    if strategy == "dynamic":
        for sampler in ranks + [single]:
            sampler.record_loss(1, 3.0)
            sampler.record_loss(2, 1.0)
            sampler.update()
    batches = [list(sampler) for sampler in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 10
    for step, (a, b) in enumerate(zip(*batches)):
        assert domains_of([a]) == domains_of([b])  # one domain per step on all processes
        assert not set(a) & set(b)  # disjoint rows
        assert a + b == list(single)[step]  # = the global batch of the single-process sampler
    # the same split as Accelerate's split_batches=True over the single-process sampler
    for rank in range(2):
        shard = BatchSamplerShard(single, num_processes=2, process_index=rank, split_batches=True)
        assert list(shard) == batches[rank]


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="strategy"):
        DomainBatchSampler(SIZES, 8, strategy="random")
    with pytest.raises(ValueError, match="at least batch_size"):
        DomainBatchSampler(SIZES, 32)
    with pytest.raises(ValueError, match="at least batch_size x num_replicas"):
        DomainBatchSampler(SIZES, 8, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        DomainBatchSampler(SIZES, 4, num_replicas=2, rank=2)
