import numpy as np
import pytest
import torch

from hf_distill.data.domain_sampler import DomainBatchSampler

SIZES = [40, 24, 16]  # rows 0-39, 40-63, 64-79


def domains_of(batches):
    return [int(np.searchsorted([40, 64, 80], batch[0], side="right")) for batch in batches]


@pytest.mark.parametrize("strategy", ["round_robin", "proportional", "balanced", "dynamic"])
def test_every_batch_holds_one_domain(strategy):
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy=strategy, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 and all(len(b) == 8 for b in batches)
    bounds = [0, 40, 64, 80]
    for batch in batches:
        domain = domains_of([batch])[0]
        assert all(bounds[domain] <= row < bounds[domain + 1] for row in batch)
        assert len(set(batch)) == 8


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
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", seed=0)
    assert domains_of(list(sampler)) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # starts round-robin
    for domain, loss in [(0, 1.0), (1, 4.0), (2, 1.0), (1, 4.0)]:
        sampler.record_loss(domain, torch.tensor(loss))
    weights = sampler.update()
    assert weights == pytest.approx([1 / 6, 4 / 6, 1 / 6])
    found = []
    for epoch in range(1, 30):
        sampler.set_epoch(epoch)
        found += domains_of(list(sampler))
    share = np.bincount(found, minlength=3) / len(found)
    assert share[1] > 0.55 and share[0] < 0.25 and share[2] < 0.25


def test_state_dict_resume_replays_the_same_sequence():
    sampler = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", seed=3)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(4)]
    sampler.record_loss(2, torch.tensor(5.0))
    sampler.record_loss(0, torch.tensor(1.0))
    sampler.update()
    rest = list(iterator)
    state = sampler.state_dict()
    sampler.set_epoch(1)
    next_epoch = list(sampler)

    resumed = DomainBatchSampler(SIZES, batch_size=8, strategy="dynamic", seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert list(resumed) == first + rest  # Trainer re-iterates the epoch to skip the batches already seen
    resumed.set_epoch(1)
    assert list(resumed) == next_epoch
    assert resumed.current_weights == sampler.current_weights
    with pytest.raises(ValueError, match="same settings"):
        DomainBatchSampler(SIZES, batch_size=8, strategy="balanced", seed=3).load_state_dict(state)


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="strategy"):
        DomainBatchSampler(SIZES, 8, strategy="random")
    with pytest.raises(ValueError, match="at least batch_size"):
        DomainBatchSampler(SIZES, 32)
