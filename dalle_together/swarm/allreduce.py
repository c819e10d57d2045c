"""hivemind's all-reduce, with each averaged part added to the local tensors as soon as it arrives.

hivemind 1.1.12's ``TensorPartContainer`` keeps every averaged part a peer receives until all parts
of the tensor it belongs to are in, hands the tensors out in order, and the averager then adds the
``torch.cat`` of each tensor's parts to the local tensor. Every reducer streams its parts back at
once, but the tensors in the first reducer's share are only complete when its last part arrives, at
the end of the round; the parts of the later reducers' tensors wait in memory until then. So at the
end of every round a peer holds close to a model's worth of float32 deltas (the gradient averager:
one copy of the gradients; the state averager: one of the parameters and each optimizer statistic)
and then concatenates and adds most of the model, while its groupmates wait for the slowest peer.

Here each part is added to the slice of the local tensor it was cut from (hivemind's parts are views
of the local tensors) when it is registered, and freed. The wire protocol is hivemind's, so peers
with and without this average together; only what a peer does with the results it gets changes.
A part is read (sent, or reduced locally) before its result can arrive, so no input is overwritten
early. A round that fails midway leaves some parts averaged and the rest as they were, where
hivemind leaves some tensors averaged: averaging is value by value, so either is a valid state.
Measured in ``benchmarks.bench_averaging`` (``--hivemind-updates`` runs hivemind's way): see
BENCHMARKS.md, "Averaging vs the all-reduce bound".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.partition import TensorPartContainer
from hivemind.utils import get_dht_time


class KeepsHivemindWireNames:
    """Base of our extensions of hivemind's averagers. hivemind names an RPC handler after the class
    (``<prefix>::TrainingStateAverager.rpc_download_state``), so a subclass would serve and call
    protocols that peers running hivemind's own class (and ``benchmarks.bench_faults``' probe) do
    not speak: keep the name of the hivemind class extended."""

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        hivemind_class = next(c for c in cls.__mro__ if c.__module__.startswith("hivemind."))
        return hivemind_class._get_handle_name(namespace, method_name)


class InPlaceTensorPartContainer(TensorPartContainer):
    """A ``TensorPartContainer`` that adds each averaged part (a delta: average minus this peer's
    values) to the local tensors when it is registered, instead of keeping it for
    ``iterate_output_tensors``, which here only waits until every part has been added."""

    alpha: float
    part_views: list[list[torch.Tensor]]

    @classmethod
    def adopt(cls, container: TensorPartContainer, alpha: float) -> InPlaceTensorPartContainer:
        """Give a container that hivemind's runner built (it builds its own) this class's behaviour."""
        assert type(container) is TensorPartContainer, "hivemind's all-reduce changed: revisit this class"
        container.__class__ = cls
        assert isinstance(container, cls)
        container.alpha = alpha
        # views of the local tensors, by peer and part; hivemind drops its own list on finalize()
        container.part_views = [[part for part, _ in parts] for parts in container._input_parts_by_peer]
        return container

    @torch.no_grad()
    def register_processed_part(self, peer_index: int, part_index: int, part: torch.Tensor) -> None:
        if part_index != self._outputs_registered_by_peer[peer_index]:
            raise ValueError(
                f"Could not register part #{part_index} from peer #{peer_index}, "
                f"expected part index: {self._outputs_registered_by_peer[peer_index]}"
            )
        if not self.finished.is_set():  # after finalize() the caller no longer owns the tensors
            self.part_views[peer_index][part_index].add_(part.reshape(-1), alpha=self.alpha)
        self._outputs_registered_by_peer[peer_index] += 1
        self._output_part_available[peer_index].set()

    async def iterate_output_tensors(self) -> AsyncIterator[torch.Tensor]:
        """Yields nothing: returns once every part is in place (raises if the round was terminated)."""
        assert not self._outputs_consumed, "output tensors are already iterated and no longer available."
        self._outputs_consumed = True
        for peer_index, num_parts in enumerate(self.num_parts_by_peer):
            while self._outputs_registered_by_peer[peer_index] < num_parts:
                if self.finished.is_set():
                    raise AllreduceException("All-reduce was terminated during iteration")
                self._output_part_available[peer_index].clear()
                await self._output_part_available[peer_index].wait()
        return
        yield  # an async generator, as the runner expects


class InPlaceAveragingMixin(KeepsHivemindWireNames):
    """For a hivemind averager: every all-reduce adds the results to the averaged tensors part by
    part (:class:`InPlaceTensorPartContainer`), not tensor by tensor at the end of the round."""

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: Any, group_id: bytes | None = None, **kwargs: Any
    ) -> None:
        # hivemind's method with the runner's container made ours (and no per-tensor loop)
        group_id = group_info.group_id if group_id is None else group_id
        runner = AllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        InPlaceTensorPartContainer.adopt(runner.tensor_part_container, self._averaging_alpha)
        assert group_id in self._running_groups, (
            f"Group id {group_id} was not registered in _register_allreduce_group"
        )
        self._running_groups[group_id].set_result(runner)
        async for _ in runner:
            raise ValueError("an in-place all-reduce yields no tensors")
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            self.last_updated = get_dht_time()
            self._state_updated.set()
