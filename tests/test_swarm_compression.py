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


# --- the fast 8-bit codec: hivemind's wire format, less CPU --------------------------------------


@pytest.fixture
def gradient_like() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(300_000) * 1e-3 + 1e-4


def test_fast_8bit_codec_speaks_hiveminds_format(gradient_like):
    from hivemind.compression import Uniform8BitQuantization

    from dalle_together.swarm.compression import FastUniform8BitQuantization

    stock, fast = Uniform8BitQuantization(), FastUniform8BitQuantization()
    info = CompressionInfo.from_tensor(gradient_like, key="g", role=TensorRole.GRADIENT)
    from_fast, from_stock = fast.compress(gradient_like, info), stock.compress(gradient_like, info)
    assert from_fast.compression == from_stock.compression
    assert len(from_fast.buffer) == len(from_stock.buffer)  # 8 + 256 * 4 + one byte per value
    # each side decodes the other's messages exactly as the sender's own decoder would
    assert torch.equal(stock.extract(from_fast), fast.extract(from_fast))
    assert torch.equal(fast.extract(from_stock), stock.extract(from_stock))
    # and the quantisation is as good: same grid, codebook of bucket means
    error = {
        name: ((codec.extract(message) - gradient_like).norm() / gradient_like.norm()).item()
        for name, codec, message in (("stock", stock, from_stock), ("fast", fast, from_fast))
    }
    assert error["fast"] < 0.05
    assert error["fast"] == pytest.approx(error["stock"], rel=0.02)


def test_fast_8bit_codec_edge_cases():
    from dalle_together.swarm.compression import FAST_UNIFORM_8BIT as fast

    for tensor in (torch.full((70_000,), 0.25), torch.randn(300, 300).half(), torch.randn(70_000).bfloat16()):
        info = CompressionInfo.from_tensor(tensor, key="t", role=TensorRole.GRADIENT)
        decoded = fast.extract(fast.compress(tensor, info))
        assert decoded.shape == tensor.shape and decoded.dtype == tensor.dtype
        assert (decoded.float() - tensor.float()).norm() <= 0.05 * tensor.float().norm()


def test_averaging_installs_the_fast_codec_as_hiveminds_decoder():
    from hivemind.compression import serialization

    from dalle_together.swarm.compression import FastUniform8BitQuantization

    averaging_compression("none", 65_537)  # even a peer that sends uncompressed decodes others' 8-bit parts
    assert isinstance(serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"], FastUniform8BitQuantization)
