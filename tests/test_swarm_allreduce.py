"""The all-reduce that puts each averaged part in place as it arrives (dalle_together.swarm.allreduce)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.partition import TensorPartContainer

from dalle_together.swarm.allreduce import InPlaceAveragingMixin, InPlaceTensorPartContainer
from dalle_together.swarm.dht import visible_maddrs


def _container(tensors: list[torch.Tensor], alpha: float = 1.0) -> InPlaceTensorPartContainer:
    # 4 values a part, and tensor 0 (10 values) is split between the two reducers, as real models' are
    container = TensorPartContainer(tensors, peer_fractions=(0.5, 0.5), part_size_bytes=16)
    return InPlaceTensorPartContainer.adopt(container, alpha)


async def _drain(container: InPlaceTensorPartContainer) -> list[torch.Tensor]:
    return [tensor async for tensor in container.iterate_output_tensors()]


def test_each_part_is_added_to_its_slice_when_it_arrives():
    tensors = [torch.arange(10.0), torch.arange(6.0)]
    container = _container(tensors, alpha=0.5)
    # reducer 0: tensor 0 [0:4] [4:8]; reducer 1: tensor 0 [8:10], tensor 1 [0:4] [4:6]
    assert container.num_parts_by_peer == (2, 3)

    async def run() -> list[torch.Tensor]:
        # the second reducer's results first: hivemind would hold them until tensor 0 was complete
        container.register_processed_part(1, 0, torch.full((2,), 2.0))
        assert tensors[0][8:].tolist() == [9.0, 10.0]
        container.register_processed_part(1, 1, torch.full((4,), 2.0))
        container.register_processed_part(1, 2, torch.full((2,), 2.0))
        assert tensors[1].tolist() == [v + 1.0 for v in range(6)]
        drained = asyncio.create_task(_drain(container))
        await asyncio.sleep(0)
        assert not drained.done()  # the first reducer's parts are still missing
        container.register_processed_part(0, 0, torch.full((4,), -2.0))
        container.register_processed_part(0, 1, torch.full((4,), -2.0))
        return await asyncio.wait_for(drained, timeout=5)

    assert asyncio.run(run()) == []  # the results are in the tensors, not handed out
    assert tensors[0].tolist() == [v - 1.0 for v in range(8)] + [9.0, 10.0]
    assert tensors[1].tolist() == [v + 1.0 for v in range(6)]


def test_parts_out_of_order_are_refused():
    container = _container([torch.zeros(10), torch.zeros(6)])
    with pytest.raises(ValueError, match="expected part index: 0"):
        container.register_processed_part(0, 1, torch.ones(4))


def test_a_terminated_round_stops_waiting_and_leaves_the_tensors_alone():
    tensors = [torch.zeros(10), torch.zeros(6)]
    container = _container(tensors)

    async def run() -> None:
        drained = asyncio.create_task(_drain(container))
        await asyncio.sleep(0)
        container.finalize()
        with pytest.raises(AllreduceException):
            await asyncio.wait_for(drained, timeout=5)

    asyncio.run(run())
    container.register_processed_part(0, 0, torch.ones(4))  # a late result
    assert all(not t.any() for t in tensors)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_peers_with_and_without_it_average_to_the_exact_mean(start_peer):
    """Three peers on loopback, two with the in-place results and one with hivemind's own averager:
    every peer ends with the exact mean, tensors cut into several parts across reducers."""
    from hivemind.averaging import DecentralizedAverager

    ours = type("Averager", (InPlaceAveragingMixin, DecentralizedAverager), {})
    run = "in-place-test"
    dhts = [start_peer(run)]
    dhts += [start_peer(run, initial_peers=visible_maddrs(dhts[0])) for _ in range(2)]
    shapes = [(64, 33), (1000,), (7,), (300, 4)]
    values = [[torch.randn(shape) for shape in shapes] for _ in dhts]
    averagers = []
    for i, (dht, cls) in enumerate(zip(dhts, (ours, ours, DecentralizedAverager), strict=True)):
        averager = cls(
            [t.clone() for t in values[i]], dht, prefix=f"{run}_averager", start=True, target_group_size=3,
            min_group_size=3, min_matchmaking_time=2.0, request_timeout=1.0, part_size_bytes=1024,
        )  # fmt: skip
        start_peer.on_shutdown(averager.shutdown)
        averagers.append(averager)
    controls = [a.step(wait=False, timeout=60) for a in averagers]
    for control in controls:
        control.result(timeout=90)
    for averager in averagers:
        with averager.get_tensors() as averaged:
            for k, tensor in enumerate(averaged):
                exact = sum(v[k] for v in values) / len(values)
                assert torch.allclose(tensor, exact, atol=1e-6), (type(averager).__name__, k)
