"""The coordinator's auxiliary peer: it follows the global epoch and saves the swarm's state.

Like the seed's aux peer, it trains nothing. Every ``cfg.swarm.checkpoint_every_epochs`` global
epochs it downloads the newest model and optimizer state from the training peers
(``hivemind.Optimizer.load_state_from_peers``) and hands them to a ``save`` callback, which writes
the checkpoint (``dalle_together.checkpoint.save_checkpoint`` prunes old ones).

It also shares its state: after a restart the coordinator :meth:`SwarmCheckpointer.restore`\\ s
the last checkpoint, and volunteers joining an otherwise empty swarm download it, epoch
included, so the collaboration resumes where it stopped instead of at epoch 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import hivemind
import torch
from hivemind.utils.logging import get_logger

from dalle_together.config import RunConfig
from dalle_together.swarm.optimizer import make_swarm_optimizer
from dalle_together.swarm.schedule import SwarmSchedule

logger = get_logger(__name__)

SaveFn = Callable[[torch.nn.Module, int, dict[str, Any]], None]
"""``save(model, epoch, optimizer_state)``: write a checkpoint of ``model`` at global ``epoch``
(``optimizer_state`` is the wrapped torch optimizer's ``state_dict()``)."""


class SwarmCheckpointer:
    """Download the swarm's state every ``every_epochs`` global epochs and save it.

    :param model: a freshly built model of the run (its weights are overwritten by downloads).
    :param save: called as ``save(model, epoch, optimizer_state)`` after each download.
    :param every_epochs: default ``cfg.swarm.checkpoint_every_epochs``.
    :param load_state_timeout_s: give up on a peer that has not sent its state within this time.
    :param schedule: the run's learning rate per epoch (it is in the optimizer state it saves and shares).
    """

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        run_id: str,
        model: torch.nn.Module,
        cfg: RunConfig,
        save: SaveFn,
        every_epochs: int | None = None,
        load_state_timeout_s: float = 600.0,
        schedule: SwarmSchedule | None = None,
    ) -> None:
        self.model, self.save = model, save
        self.every_epochs = every_epochs if every_epochs is not None else cfg.swarm.checkpoint_every_epochs
        if self.every_epochs < 1:
            raise ValueError("every_epochs must be at least 1")
        self.optimizer = make_swarm_optimizer(
            dht=dht,
            run_id=run_id,
            model=model,
            cfg=cfg,
            batch_size_per_step=None,
            client_mode=False,
            auxiliary=True,
            load_state_timeout_s=load_state_timeout_s,
            schedule=schedule,
        )
        # hivemind's auxiliary peers don't share state by default; this one holds the last checkpoint
        self.optimizer.state_averager.allow_state_sharing = True
        self.last_saved_epoch = 0
        self._shut_down = False

    @property
    def global_epoch(self) -> int:
        """The newest epoch hivemind's progress tracker has seen (its own epoch included)."""
        return max(self.optimizer.tracker.global_epoch, self.optimizer.local_epoch)

    @property
    def local_epoch(self) -> int:
        """The epoch of the state this peer holds (and shares with joiners)."""
        return self.optimizer.local_epoch

    def restore(
        self,
        *,
        epoch: int,
        model_state: Mapping[str, torch.Tensor] | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        """Resume from a checkpoint at global ``epoch``: joiners of an empty swarm will start from it.

        :param model_state: the checkpoint's weights; or load them into ``self.model`` yourself,
          *after* constructing this object (hivemind runs a zero-gradient optimizer step at
          construction to create the optimizer's state, and weight decay nudges the weights).
        :param optimizer_state: what ``save`` received, so joiners also get the optimizer's moments.
        """
        opt = self.optimizer
        if model_state is not None:
            with torch.no_grad():
                self.model.load_state_dict(model_state)
        if optimizer_state is not None:
            # hivemind pops "local_epoch" out of the dict it is given: hand it a copy
            opt.load_state_dict({**optimizer_state, "state": dict(optimizer_state["state"])})
        opt.state_averager.local_epoch = epoch
        opt.tracker.report_local_progress(local_epoch=epoch, samples_accumulated=0)
        opt.state_averager.state_sharing_priority = epoch  # joiners download from the newest epoch
        self.last_saved_epoch = epoch
        logger.info(f"restored the swarm's state at epoch {epoch}")

    def due(self) -> bool:
        return self.global_epoch >= self.last_saved_epoch + self.every_epochs

    def save_now(self) -> int | None:
        """Download the newest state from the peers and save it; its epoch, or None if none answered."""
        target = self.global_epoch
        self.optimizer.load_state_from_peers()
        epoch = self.optimizer.local_epoch
        if epoch < target:
            logger.warning(
                f"could not download the state of epoch {target} from peers (have {epoch}); will retry"
            )
            return None
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"].pop("local_epoch", None)  # a plain torch state dict; the epoch is separate
        self.save(self.model, epoch, optimizer_state)
        self.last_saved_epoch = epoch
        logger.info(f"saved the swarm's state at epoch {epoch}")
        return epoch

    def poll(self) -> int | None:
        """Save if ``every_epochs`` epochs have passed since the last save; the epoch saved, if any."""
        return self.save_now() if self.due() else None

    def run(self, stop: threading.Event, *, poll_s: float = 5.0) -> None:
        """:meth:`poll` every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.wait(poll_s):
            self.poll()

    def shutdown(self) -> None:
        if not self._shut_down:
            self._shut_down = True
            self.optimizer.shutdown()
