"""What peers compress when they average or hand over state: optimizer statistics must survive intact."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo, TensorRole, deserialize_torch_tensor

from dalle_together.swarm.optimizer import averaging_compression, state_averaging_compression


def round_trip(compression, tensor: torch.Tensor, role: TensorRole) -> torch.Tensor:
    info = CompressionInfo.from_tensor(tensor, key="t", role=role)
    return deserialize_torch_tensor(compression.compress(tensor, info))


@pytest.mark.parametrize("kind", ["fp16", "8bit"])
def test_adam_second_moments_survive_state_averaging(kind):
    # second moments of the tiny model are ~1e-8: fp16 flushes them towards 0 and Adam's next
    # update m / (sqrt(v) + eps) explodes
    torch.manual_seed(0)
    second_moment = torch.rand(100_000) * 1e-7
    lossy = round_trip(averaging_compression(kind, 65_537), second_moment, TensorRole.OPTIMIZER)
    assert not torch.allclose(lossy, second_moment, rtol=1e-2, atol=0)  # what the product used to send

    kept = round_trip(state_averaging_compression(kind, 65_537), second_moment, TensorRole.OPTIMIZER)
    assert torch.equal(kept, second_moment)


def test_parameters_are_still_compressed_like_gradients():
    weights = torch.randn(100_000)
    sent = round_trip(state_averaging_compression("8bit", 65_537), weights, TensorRole.PARAMETER)
    assert not torch.equal(sent, weights)  # quantised...
    assert (sent - weights).norm() / weights.norm() < 0.05  # ...but close
