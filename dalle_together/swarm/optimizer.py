"""hivemind.Optimizer configured from a :class:`RunConfig`, the way the seed's dalle-hivemind run was.

The training loop treats the result as an ordinary torch optimizer (``loss.backward();
optimizer.step(); optimizer.zero_grad()``): it accumulates local gradients until the whole
swarm has processed ``cfg.optim.target_batch_size`` samples (one *epoch*), then averages
gradients with the peers (compressed), runs the wrapped optimizer (AdamW or LAMB with clipping
inside its ``step``) and steps the learning-rate schedule once: the schedule follows the global
epoch, so every peer agrees on it. ``optimizer.local_epoch`` is that global step.

With ``cfg.swarm.local_updates`` (hivemind's ``use_local_updates``) every ``step()`` applies the
peer's own gradients at once, and the epoch only paces the schedule and the averaging of
parameters, every ``average_state_every`` epochs, in the background: hivemind adds each round's
change to the parameters (``delta_rule_averaging``), so local steps made meanwhile are kept.

Constraints of hivemind 1.1.12, checked here so they fail at start-up with a sentence:
``delay_grad_averaging`` needs ``delay_optimizer_step``, which needs ``offload_optimizer``
(hivemind only asserts the latter at the first epoch); a client-mode peer cannot be auxiliary.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, AsyncIterator, Literal  # noqa: UP035 (hivemind spots streaming RPCs by typing's alias)

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    RoleAdaptiveCompression,
    SizeAdaptiveCompression,
)
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import achain, as_aiter

from dalle_together.config import OptimConfig, RunConfig, SwarmConfig
from dalle_together.errors import UserError
from dalle_together.optim import build_optimizer
from dalle_together.swarm import compression as fast_codecs
from dalle_together.swarm.allreduce import InPlaceAveragingMixin, KeepsHivemindWireNames
from dalle_together.swarm.dht import signing_key
from dalle_together.swarm.schedule import SwarmSchedule

Compression = Literal["none", "fp16", "8bit"]

# Why state averaging at all (``SwarmConfig.average_state_every``): gradient averaging alone keeps
# peers identical only while every peer joins every round without lossy compression; state
# averaging pulls back peers that missed a round or drifted through 8-bit/fp16 rounding. Every 5
# epochs costs 1/5 of the bandwidth of doing it every epoch.


PROGRESS_REPORT_INTERVAL_S = 2.0
"""Publish this peer's progress towards the next epoch at most this often (and at once on a new epoch)."""


GROUP_QUERY_INTERVAL_S = 0.25
"""While looking for an averaging group, query the DHT for candidates at most this often."""


def _pace_group_queries() -> None:
    """Make every averager forked from this process query for averaging partners at most every
    :data:`GROUP_QUERY_INTERVAL_S` seconds.

    In hivemind 1.1.12 a peer looking for a group asks the DHT for candidates again as soon as the
    previous answer arrives: 50-80 queries a second during each matchmaking window, each one a
    round trip through the averager's and the DHT's processes. On a 2-core machine shared by two
    volunteers that was a tenth of a core per volunteer; a quarter of a second between queries is
    nothing against a matchmaking window of seconds. Idempotent; affects this process and the
    averager processes it starts afterwards.
    """
    if getattr(GroupKeyManager.get_averagers, "_paced", False):
        return
    original = GroupKeyManager.get_averagers

    async def get_averagers(self: GroupKeyManager, group_key: str, only_active: bool):
        wait_s = getattr(self, "_last_query_time", -math.inf) + GROUP_QUERY_INTERVAL_S - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        self._last_query_time = time.monotonic()
        return await original(self, group_key, only_active)

    get_averagers._paced = True
    GroupKeyManager.get_averagers = get_averagers


class ThrottledProgressTracker(ProgressTracker):
    """hivemind's progress tracker, publishing at most every ``report_interval_s`` within an epoch.

    hivemind 1.1.12 publishes a peer's progress after every local step; a volunteer on a CPU takes
    several steps a second, and each publication is a signed, validated DHT store on the peer and on
    the peers that keep the record: on a 2-core machine that cost a quarter of a core per volunteer.
    Two seconds' delay in counting samples is noise against epochs of many seconds (and hivemind
    extrapolates every peer's count from its reported speed); a new epoch is
    still published at once, so the others learn about it without delay.

    hivemind's reporter stops publishing a peer whose reports showed no samples during an epoch, so
    the first samples of every epoch are reported at once; without that, short epochs hid each
    volunteer from the other and each accumulated the whole target by itself (1.8x per epoch).
    """

    def __init__(self, *args, report_interval_s: float = PROGRESS_REPORT_INTERVAL_S, **kwargs) -> None:
        self.report_interval_s = report_interval_s
        self._last_report_time, self._last_report_epoch = -math.inf, None
        self._reported_samples = False
        super().__init__(*args, **kwargs)

    def report_local_progress(
        self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True
    ) -> None:
        # hivemind 1.1.12's method, except that it wakes the reporter only when a report is due
        extra_samples = samples_accumulated - self.local_progress.samples_accumulated
        if update_global_samples and local_epoch == self.local_progress.epoch == self.global_progress.epoch:
            self.global_progress.samples_accumulated += extra_samples
        if extra_samples > 0:
            self.performance_ema.update(task_size=extra_samples)
        else:
            self.performance_ema.reset_timer()
        self.local_progress = self._get_local_progress(local_epoch, samples_accumulated)
        now = time.monotonic()
        new_epoch = local_epoch != self._last_report_epoch
        # hivemind's reporter stops publishing a peer whose reports showed no samples for a whole
        # epoch (it takes it for an auxiliary peer): the first samples of every epoch go out at once
        first_samples = samples_accumulated > 0 and not self._reported_samples
        if new_epoch or first_samples or now - self._last_report_time >= self.report_interval_s:
            if new_epoch:
                self._reported_samples = False
            self._reported_samples |= samples_accumulated > 0
            self._last_report_time, self._last_report_epoch = now, local_epoch
            self.should_report_progress.set()


class SwarmOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` that spends less of a small machine on coordination.

    - progress is published at most once a second (:class:`ThrottledProgressTracker`);
    - a peer that is alone in the swarm does not look for averaging partners: hivemind 1.1.12
      pre-schedules matchmaking before every epoch regardless, and a peer looking for a group
      queries the DHT many times a second (through its DHT process) until it gives up, only to
      cancel the round at the epoch's end because there is nobody to average with.
    """

    def __init__(self, *, progress_report_interval_s: float = PROGRESS_REPORT_INTERVAL_S, **kwargs) -> None:
        self._progress_report_interval_s = progress_report_interval_s
        super().__init__(**kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return ThrottledProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            report_interval_s=self._progress_report_interval_s,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind 1.1.12's arguments, with our class
        return BoundedStateRoundsAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _alone(self) -> bool:
        return self.tracker.global_progress.num_peers <= 1

    def _maybe_schedule_gradient_averaging(self) -> None:
        if not self._alone():
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if not self._alone():
            super()._maybe_schedule_state_averaging()


class WaitsForItsOwnGroup(KeepsHivemindWireNames):
    """For a hivemind averager: a groupmate's parts that arrive before this peer started the round's
    all-reduce wait for this peer's own group, instead of being refused.

    hivemind 1.1.12's handler for incoming parts waits on one event, ``_pending_groups_registered``,
    which a round clears when it starts looking for a group and which any round sets when it starts
    *or ends* its all-reduce. With delayed updates the next epoch's round is pre-scheduled while the
    last one is still running; when the last one ends it sets the event although the new round has
    not started its all-reduce. A groupmate that triggers first (peers trigger up to a local step
    apart) is then answered BAD_GROUP_ID at once, and for that round each peer keeps its own values
    for the other's share of the tensors (hivemind logs "Averaging: received 50% results" on one,
    "Reducer: received 50% of input tensors" on the other). In a 2.5-minute verbose ``make demo``
    (epochs of ~0.7 s) that was 27 of 186 gradient rounds, each one after a round that ended after
    the next one was pre-scheduled.

    The wait is bounded by the reducer timeout: the groupmate stops waiting for an answer then anyway.
    """

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if request.group_id not in self._running_groups:
            await self._wait_for_group(request.group_id)
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def _wait_for_group(self, group_id: bytes) -> None:
        timeout = self.allreduce_kwargs.get("reducer_timeout") or self.request_timeout
        deadline = time.monotonic() + timeout
        while group_id not in self._running_groups and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._group_registered().wait(), deadline - time.monotonic())

    def _group_registered(self) -> asyncio.Event:
        """An event set when the next group starts its all-reduce, shared by every handler waiting
        until then (created lazily: it belongs to the event loop of the averager's process)."""
        if getattr(self, "_next_group_registered", None) is None:
            self._next_group_registered = asyncio.Event()
        return self._next_group_registered

    @contextlib.contextmanager
    def _register_allreduce_group(self, group_info: Any) -> Iterator[None]:
        with super()._register_allreduce_group(group_info):
            waiting, self._next_group_registered = getattr(self, "_next_group_registered", None), None
            if waiting is not None:
                waiting.set()
            yield


def matchmaking_request_timeout(matchmaking_time_s: float) -> float:
    """How long an averager waits for a groupmate's matchmaking answer: below the matchmaking time,
    as hivemind asks (a longer one can deadlock matchmaking), and at most 3 s."""
    return min(3.0, matchmaking_time_s / 2)


STATE_ROUND_PATIENCE = 2.0
"""A state-averaging round looks for a group for at most this many matchmaking times."""


class BoundedStateRoundsAverager(InPlaceAveragingMixin, WaitsForItsOwnGroup, TrainingStateAverager):
    """hivemind's ``TrainingStateAverager`` whose state-averaging rounds stop looking for a group
    after :data:`STATE_ROUND_PATIENCE` matchmaking times instead of hivemind's averaging timeout.

    hivemind 1.1.12 starts a state round's matchmaking in the background right after the epoch's
    transition and makes the next optimizer step wait for that round (for up to the all-reduce
    timeout). A peer that loses the race for a group (two of three formed one without it) keeps
    looking, alone, for the whole averaging timeout: its next step stalls for the all-reduce timeout,
    its next gradient round stalls its groupmates, and with epochs shorter than that it falls out
    of sync and downloads the state again. Seen in the testbed (3 volunteers, 20 Mbit/s, epochs of
    2-10 s): a 15 s stall at every state-averaging epoch some peer lost. Groups form within one
    matchmaking time of the last peer's transition; a round that found none by then skips this
    state averaging (the next comes ``average_state_every`` epochs later). Averaged parameters
    and statistics are put in place part by part (:class:`~dalle_together.swarm.allreduce.InPlaceAveragingMixin`).
    """

    def _do(
        self,
        wait_for_trigger: Any,
        optimizer_step: bool,
        zero_grad: bool,
        averaging_round: bool,
        averaging_control: StepControl | None,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        # hivemind's _do would start the round itself with ``timeout`` as the matchmaking deadline;
        # handed a started round, it only triggers it, and still waits up to ``timeout`` for the result
        if averaging_round and averaging_control is None:
            patience = STATE_ROUND_PATIENCE * self.matchmaking_kwargs["min_matchmaking_time"]
            # a failure here is left to hivemind's _do, which retries inside the handling that
            # releases the threads waiting for this step
            with contextlib.suppress(Exception):
                averaging_control = DecentralizedAverager.step(
                    self,
                    gather=self.local_epoch,
                    require_trigger=True,
                    timeout=patience if timeout is None else min(timeout, patience),
                    wait=False,
                    **kwargs,
                )
        super()._do(
            wait_for_trigger,
            optimizer_step,
            zero_grad,
            averaging_round,
            averaging_control,
            *args,
            timeout=timeout,
            **kwargs,
        )


class QuietDeclarationsMixin(KeepsHivemindWireNames):
    """For a hivemind averager: declare this peer a state donor in the DHT only when the declaration
    changes (sharing switched on or off, a new priority) or expires (when hivemind, idle, renews it).

    hivemind 1.1.12 re-stores the same declaration after every tensor of every all-reduce (its
    ``_run_allreduce_inplace_`` wakes the declaring loop after each in-place update): for a
    24-tensor model, 24 DHT stores per round, each through the DHT's process to the peers keeping
    the record, while the all-reduce needs that CPU. 8-bit averaging of 25M parameters over 4 peers
    on this 2-core machine: 6.9-7.8 CPU-s a round and 1.42-1.44x the all-reduce bound with them,
    6.0 CPU-s and 1.30-1.33x without (BENCHMARKS.md, "Averaging vs the all-reduce bound").

    Used by ``benchmarks.bench_averaging``. The swarm's averagers do without it: the gradient
    averager shares no state and never declares, and the state averager all-reduces once every
    ``average_state_every`` epochs. (It was taken out of the state averager after the testbed's
    three-volunteer test failed with it; it failed without it too: its epochs were shorter than
    hivemind's timeouts allow for, see :class:`BoundedStateRoundsAverager`.)
    """

    async def _declare_for_download_periodically(self) -> None:
        download_key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        declared: tuple[bool, float] | None = None
        expiration_time = -math.inf
        while True:
            self._state_updated.clear()  # before reading: a change made meanwhile wakes the wait below
            declaration = (self.allow_state_sharing, self.state_sharing_priority)
            if declaration != declared or get_dht_time() >= expiration_time:
                expiration_time = get_dht_time() + self.declare_state_period
                sharing, priority = declaration
                if sharing or (declared is not None and declared[0]):  # None withdraws the last one
                    store = self.dht.store(
                        download_key,
                        subkey=self.peer_id.to_bytes(),
                        value=priority if sharing else None,
                        expiration_time=expiration_time,
                        return_future=True,
                    )
                    asyncio.create_task(asyncio.wait_for(store, timeout=self.declare_state_period))
                declared = declaration
            with contextlib.suppress(asyncio.TimeoutError):
                timeout = max(0.0, expiration_time - get_dht_time())
                await asyncio.wait_for(self._state_updated.wait(), timeout=timeout)


class SharedAccumulatorsGradientAverager(InPlaceAveragingMixin, WaitsForItsOwnGroup, GradientAverager):
    """hivemind's ``GradientAverager`` with its gradient accumulators in shared memory.

    hivemind forks the averager's process after allocating the accumulators; the training process
    then rewrites them at every local step, and copy-on-write leaves the averager's process holding
    a private copy of the pages as they were at the fork: a model's worth of gradients per CPU
    volunteer that nobody reads. Shared pages are not copied on write. Results are added to the
    accumulators part by part as they arrive (:class:`~dalle_together.swarm.allreduce.InPlaceAveragingMixin`).
    Its RPCs keep hivemind's names, so a peer running hivemind's own ``GradientAverager`` averages
    with it.
    """

    def __init__(self, *args: Any, start: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, start=False, **kwargs)
        share_cpu_tensors(self._local_accumulators or ())
        if start:
            self.run_in_background(await_ready=True)


def share_cpu_tensors(tensors: Iterable[Any], min_numel: int = 1) -> None:
    """Move the CPU tensors among ``tensors`` with at least ``min_numel`` values into shared memory
    (in place), for the reason given in :class:`SharedAccumulatorsGradientAverager`."""
    for tensor in tensors:
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.device.type == "cpu"
            and tensor.numel() >= min_numel
            and not tensor.is_shared()
        ):
            tensor.share_memory_()


def share_cpu_parameters(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> None:
    """Move CPU parameters into shared memory before hivemind forks its averagers' processes (the
    optimizer rewrites them every epoch: each of a volunteer's two averager processes would end up
    with a stale copy)."""
    for item in params:
        share_cpu_tensors(item["params"] if isinstance(item, dict) else [item])


SHARED_STATE_MIN_NUMEL = 4096
"""Optimizer statistics at least this big move to shared memory (smaller ones aren't worth a file)."""


def build_shared_state_optimizer(params: Any, *, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The run's optimizer, whose CPU statistics move to shared memory after its first step.

    hivemind creates the offloaded optimizer's statistics (Adam's two moments: two models' worth)
    with a first step, then forks the state averager's process, then the gradient averager's; the
    training process rewrites the statistics every epoch, and copy-on-write would leave the two
    averager processes holding a stale copy of them (see :class:`SharedAccumulatorsGradientAverager`).
    Only pages that exist at a fork are copied on write, so this is needed once, not every epoch.
    """
    optimizer = build_optimizer(params, cfg=cfg)

    def share_statistics_once(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        hook.remove()
        for state in opt.state.values():
            share_cpu_tensors(state.values(), min_numel=SHARED_STATE_MIN_NUMEL)

    hook = optimizer.register_step_post_hook(share_statistics_once)
    return optimizer


def progress_refresh_period(swarm: SwarmConfig) -> float:
    """Shortest wait between two reads of the swarm's progress: a fifth of the matchmaking window,
    hivemind's 0.5 s at most. Short matchmaking means short epochs, where the overshoot past the
    target batch, about this period times the swarm's samples/s, would be a large fraction."""
    return min(0.5, max(0.1, swarm.matchmaking_time_s / 5))


def averaging_compression(kind: Compression, threshold: int) -> CompressionBase:
    """How tensors are compressed when averaged: ``8bit`` quantizes big tensors, fp16 small ones.

    ``8bit`` is hivemind's uniform 8-bit quantisation with a faster codec (same bytes on the wire),
    which this installs as this process's 8-bit decoder whatever ``kind`` is: peers choose their own
    compression, and the others' 8-bit parts still arrive (see :mod:`dalle_together.swarm.compression`).
    """
    fast_codecs.install()
    if kind == "none":
        return NoCompression()
    if kind == "fp16":
        return Float16Compression()
    if kind == "8bit":
        return SizeAdaptiveCompression(
            threshold=threshold, less=Float16Compression(), greater_equal=fast_codecs.FAST_UNIFORM_8BIT
        )
    raise UserError(f"unknown compression {kind!r}; choose none, fp16 or 8bit")


def state_averaging_compression(kind: Compression, threshold: int) -> CompressionBase:
    """How parameters and optimizer statistics are compressed when peers average their state:
    parameters like gradients, optimizer statistics not at all.

    Adam's and LAMB's second moment is the running mean of squared gradients, ~1e-8 on the tiny
    model: below fp16's smallest normal number (6e-5), so fp16 rounds it coarsely or to 0, and the
    next update ``m / (sqrt(v) + eps)`` explodes (measured: 25x the learning rate rms, up to 16,832x
    for single weights, after one fp16 round trip; 8-bit quantisation is worse). The cost is
    8 bytes per parameter per state-averaging round, every ``average_state_every`` epochs.
    """
    return RoleAdaptiveCompression(parameter=averaging_compression(kind, threshold), default=NoCompression())


def _make_scheduler(
    optimizer: torch.optim.Optimizer, *, schedule: SwarmSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.multiplier)


def default_param_groups(
    model: torch.nn.Module, cfg: OptimConfig
) -> list[dict[str, Any]] | list[torch.Tensor]:
    """The model's own parameter groups (decay / no decay) if it defines them, else its parameters."""
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg.weight_decay)
    return [p for p in model.parameters() if p.requires_grad]


def make_swarm_optimizer(
    *,
    dht: hivemind.DHT,
    run_id: str,
    model: torch.nn.Module,
    cfg: RunConfig,
    batch_size_per_step: int | None,
    client_mode: bool,
    auxiliary: bool = False,
    compression: Compression | None = None,
    param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor] | None = None,
    average_state_every: int | None = None,
    load_state_timeout_s: float = 600.0,
    schedule: SwarmSchedule | None = None,
    verbose: bool = False,
) -> hivemind.Optimizer:
    """A hivemind.Optimizer over ``model``'s parameters, configured from ``cfg.optim`` and ``cfg.swarm``.

    :param batch_size_per_step: samples behind each ``step()`` call of this peer (``None`` if auxiliary).
    :param client_mode: must match the DHT's (hivemind 1.1.12 silently uses the DHT's mode anyway).
    :param auxiliary: a peer that trains nothing but may help averaging and serve/download state
      (the coordinator's checkpointer); it never runs the optimizer, so it is never offloaded.
    :param compression: averaging compression; ``None`` uses ``cfg.swarm.compression``.
    :param param_groups: default: ``model.param_groups(weight_decay)`` (or all trainable parameters).
    :param schedule: the learning rate per epoch, kept up to date by a
      :class:`~dalle_together.swarm.schedule.ScheduleFollower`; default: ``cfg.optim``'s.
    :note: a peer joining a running swarm must call ``load_state_from_peers()`` before training.
    """
    swarm = cfg.swarm
    if auxiliary and client_mode:
        raise UserError("an auxiliary peer must accept connections; it cannot run in client mode")
    if auxiliary != (batch_size_per_step is None):
        raise ValueError("give batch_size_per_step to a training peer, and only to a training peer")
    if batch_size_per_step is not None and batch_size_per_step <= 0:
        raise UserError(f"batch size per step must be positive, got {batch_size_per_step}")
    offload, delay_step, delay_grads = (
        swarm.offload_optimizer,
        swarm.delay_optimizer_step,
        swarm.delay_grad_averaging,
    )
    if auxiliary or swarm.local_updates:
        # an auxiliary peer never steps; a local update is applied before the next local batch
        offload = delay_step = delay_grads = False
    if delay_grads and not delay_step:
        raise UserError("delay_grad_averaging needs delay_optimizer_step (a hivemind 1.1.12 requirement)")
    if delay_step and not offload:
        raise UserError(
            "delay_optimizer_step needs offload_optimizer (the delayed step runs on offloaded copies)"
        )
    if average_state_every is None:
        average_state_every = swarm.average_state_every
    if average_state_every < 1:
        raise ValueError("average_state_every must be at least 1")
    if client_mode != dht.client_mode:
        raise ValueError(
            f"client_mode={client_mode} but the DHT was started with client_mode={dht.client_mode}"
        )

    request_timeout = matchmaking_request_timeout(swarm.matchmaking_time_s)
    kind = compression if compression is not None else swarm.compression
    averaging = averaging_compression(kind, swarm.size_adaptive_threshold)
    params = list(param_groups) if param_groups is not None else default_param_groups(model, cfg.optim)
    share_cpu_parameters(params)

    _pace_group_queries()
    with _keeping_sigint_handler():
        return SwarmOptimizer(
            dht=dht,
            run_id=run_id,
            target_batch_size=cfg.optim.target_batch_size,
            batch_size_per_step=batch_size_per_step,
            params=params,
            optimizer=partial(build_shared_state_optimizer, cfg=cfg.optim),
            scheduler=partial(_make_scheduler, schedule=schedule or SwarmSchedule(cfg.optim)),
            matchmaking_time=swarm.matchmaking_time_s,
            averaging_timeout=swarm.averaging_timeout_s,
            allreduce_timeout=swarm.allreduce_timeout_s,
            next_chunk_timeout=swarm.next_chunk_timeout_s,
            load_state_timeout=load_state_timeout_s,
            offload_optimizer=offload,
            delay_optimizer_step=delay_step,
            delay_grad_averaging=delay_grads,
            average_state_every=average_state_every,
            client_mode=client_mode,
            auxiliary=auxiliary,
            grad_compression=averaging,
            state_averaging_compression=state_averaging_compression(kind, swarm.size_adaptive_threshold),
            # a joiner starts from exactly the state the others have: fp16 would damage the optimizer's
            # second moments (see state_averaging_compression) and leave its weights a rounding apart
            load_state_compression=NoCompression(),
            # one key signs all of this peer's records, so peers sharing a process stay distinct
            # hivemind reads the swarm's progress at most every 0.5 s by default: with epochs of a
            # second (a small run on fast links) each peer overshoots the target by half an epoch's
            # samples, which are averaged in but add nothing to the optimizer's step count
            tracker_opts=dict(
                private_key=signing_key(dht), min_refresh_period=progress_refresh_period(swarm)
            ),
            # hivemind warns (and may deadlock) when a request may outlive the matchmaking window;
            # 1.1.12 forwards averager_opts to the state averager only, so the gradient averager's
            # timeout goes through its factory. The gradient averager shares no state: joiners reset the
            # gradients they would download, and a sharing averager re-declares itself in the DHT after
            # every tensor of every all-reduce (dozens of signed stores per epoch)
            averager_opts=dict(request_timeout=request_timeout),
            use_local_updates=swarm.local_updates,
            grad_averager_factory=None
            if swarm.local_updates  # nothing to average: each peer applies its own gradients
            else partial(
                SharedAccumulatorsGradientAverager, request_timeout=request_timeout, allow_state_sharing=False
            ),
            verbose=verbose,
        )


@contextlib.contextmanager
def _keeping_sigint_handler() -> Iterator[None]:
    """hivemind 1.1.12's averagers set SIGINT to "ignore" in the process that starts them (so their
    children ignore a terminal's Ctrl-C) and never restore it: restore it, or Ctrl-C stops working."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def apply_pending_updates(optimizer: hivemind.Optimizer) -> None:
    """Wait for background optimizer steps and averaging rounds and copy their results into the model.

    With ``delay_optimizer_step`` the model lags one step behind the optimizer; call this before
    reading or saving the model's weights outside the training loop.
    """
    optimizer.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
