"""``StructuredPruning``: remove whole channels from the student on a schedule, while it trains.

Channels are removed physically with Torch-Pruning's dependency graph (Fang et al. 2023,
"DepGraph", arXiv:2301.12900; see ``distill.arch``): every layer coupled to a pruned channel
(the next convolution's input, batch norm, residual partners) shrinks with it, so tensors,
parameters and MACs really drop and the exported ONNX runs faster on a dense CPU.

Each scheduled step prunes from the current to the scheduled sparsity, measured against the
*original* widths, which the callback state keeps: iterative steps and resumed runs land on the
widths a one-shot prune would give (Torch-Pruning's own ``MetaPruner`` measures ratios from the
widths it was built on, which a resumed run no longer has). The output layer (``fc``, else the
last ``Linear``) and the layers named in ``ignore_layers`` keep their output channels.

A prune replaces ``nn.Parameter`` objects, and an optimizer built before it would silently stop
updating the pruned layers. So the callback rebuilds the optimizer with
``trainer.strategy.setup_optimizers`` and carries its state over: momentum and Adam moments of
the surviving elements (by index), every group's hyper-parameters (the current learning rate)
and the LR schedulers' progress. Then ``pl_module.rebuild_adapters()`` re-creates the feature
adapters whose input width changed.

DDP: global rank 0 decides which channels go and broadcasts the plan, so ranks agree even with
``taylor`` importance (gradients differ per rank; no reliance on determinism); every rank
applies it; then the DDP wrapper is rebuilt (``strategy.model = lightning_module``;
``strategy.configure_ddp()``). Checked by hand with two CPU processes (gloo, ``strategy="ddp"``):
same widths and weights on both ranks, the wrapper holds the new parameters. With
``ddp_spawn`` the main process gets the pruned weights back into its unpruned module and fails
(size mismatch): reshape it with ``distill.arch.reshape_to_state_dict`` or use ``ddp``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from distill.arch import (
    IMPORTANCES,
    Plan,
    apply_plan,
    count_macs_params,
    kept_channels,
    output_layer_name,
    resolve_layer_names,
    score_channels,
    select_channels,
)
from distill.errors import UserError

from .schedules import (
    batch_step,
    check_granularity,
    check_layer_list,
    check_sparsity,
    make_schedule,
)

_MAX_CHANNEL_SPARSITY = 0.95  # upper end of the search for a MACs target
_SEARCH_STEPS = 12
_MACS_STEP = 0.01  # batch granularity with a MACs target: search once per point of MACs


class OptimizerSnapshot:
    """Optimizer and LR-scheduler state by parameter *name*, to survive a parameter swap."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {p: n for n, p in pl_module.named_parameters()}
        self.optimizers = []
        for opt in trainer.optimizers:
            state = {names[p]: (tuple(p.shape), dict(opt.state[p]))
                     for p in opt.state if p in names}
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            self.optimizers.append((state, hyper))
        self.schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]

    @staticmethod
    def _carry(value: Any, old_shape: tuple, new: nn.Parameter, index: torch.Tensor | None):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape != old_shape:
            return value  # e.g. Adam's step count
        if index is not None:
            return value.reshape(-1)[index.reshape(-1).to(value.device)].view(new.shape).clone()
        return value if value.shape == new.shape else None

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                index: dict[str, torch.Tensor]) -> int:
        """Load the snapshot into the rebuilt optimizers; returns parameters whose state carried.

        Args:
            index: Full parameter name -> flat indices of the kept elements (``apply_plan``).
        """
        names = {p: n for n, p in pl_module.named_parameters()}
        carried = 0
        for config, sched_state in zip(trainer.lr_scheduler_configs, self.schedulers):
            config.scheduler.load_state_dict(sched_state)
        for opt, (state, hyper) in zip(trainer.optimizers, self.optimizers):
            if len(hyper) == len(opt.param_groups):  # the current LR, not the initial one
                for group, old in zip(opt.param_groups, hyper):
                    group.update(old)
            for group in opt.param_groups:
                for p in group["params"]:
                    if names.get(p) not in state:
                        continue
                    old_shape, old_state = state[names[p]]
                    new_state = {k: self._carry(v, old_shape, p, index.get(names[p]))
                                 for k, v in old_state.items()}
                    if all(v is not None for v in new_state.values()):
                        opt.state[p] = new_state
                        carried += 1
        return carried


class StructuredPruning(Callback):
    """Prune whole channels of ``pl_module.student`` on a sparsity schedule.

    Args:
        schedule: ``constant``, ``linear``, ``cubic``, ``exponential`` or a callable
            ``epoch -> sparsity`` (see ``distill.callbacks.schedules``).
        initial_sparsity: Sparsity at ``start_epoch``.
        target_sparsity: Share of channels removed at ``end_epoch``: per layer, or of all
            prunable channels with ``global_pruning``.
        start_epoch: First epoch that prunes.
        end_epoch: Epoch at which the target is reached; later epochs fine-tune.
        target_macs_reduction: If set, the schedule runs on the share of MACs removed instead,
            and each step searches the channel sparsity that reaches it.
        importance: ``l1`` (default), ``l2``, ``bn_scale`` or ``taylor`` (gradients of the
            cross-entropy on one training batch).
        global_pruning: Rank channels across layers instead of within each layer.
        round_to: Keep channel counts multiples of this (SIMD-friendly widths).
        ignore_layers: Names of student layers whose output channels are never pruned (the
            output layer is always kept).
        granularity: ``epoch`` (prune at epoch start) or ``batch`` (the schedule runs on
            fractional epochs and prunes at the first batch where a channel is due).

    Example:
        >>> pruning = StructuredPruning("cubic", target_sparsity=0.5, start_epoch=1, end_epoch=4)
        >>> Trainer(max_epochs=8, callbacks=[pruning]).fit(module, datamodule)
    """

    def __init__(
        self,
        schedule: str | Callable[[float], float] = "cubic",
        initial_sparsity: float = 0.0,
        target_sparsity: float = 0.5,
        start_epoch: int = 0,
        end_epoch: int = 3,
        target_macs_reduction: float | None = None,
        importance: str = "l1",
        global_pruning: bool = False,
        round_to: int | None = None,
        ignore_layers: Sequence[str] = (),
        granularity: str = "epoch",
    ) -> None:
        if importance not in IMPORTANCES:
            raise UserError(f"'importance' must be one of {', '.join(IMPORTANCES)}; "
                            f"got '{importance}'")
        check_granularity(granularity)
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise UserError(f"'round_to' must be a positive integer or None; got {round_to!r}")
        ignore_layers = check_layer_list(ignore_layers)
        final = target_sparsity
        if target_macs_reduction is not None:
            final = check_sparsity("target_macs_reduction", target_macs_reduction)
        self.schedule = make_schedule(schedule, initial_sparsity, final, start_epoch, end_epoch)
        self.schedule_name = schedule if isinstance(schedule, str) else "callable"
        self.target_macs_reduction = target_macs_reduction
        self.importance = importance
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.ignore_layers = ignore_layers
        self.granularity = granularity
        self.end_epoch = end_epoch
        self._last_batch: Any = None
        # Resume state (plain values): what was applied, and the widths it is measured from.
        self.sparsity = 0.0  # the last scheduled value applied (channels, or MACs share)
        self.channel_sparsity = 0.0
        self.original_widths: dict[str, int] = {}
        self.widths: dict[str, int] = {}
        self.original_macs: int | None = None
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> StructuredPruning:
        """Build from the recipe's ``prune`` section (a dict or ``distill.config.PruneConfig``)."""
        c = cfg if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
        return cls(c["schedule"], c["initial_sparsity"], c["target_sparsity"], c["start_epoch"],
                   c["end_epoch"], c["target_macs_reduction"], c["importance"],
                   c["global_pruning"], c["round_to"], list(c["ignore_layers"]), c["granularity"])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(importance=self.importance, granularity=self.granularity)

    # ----- decision --------------------------------------------------------------------------
    def due(self, scheduled: float, final: bool = True) -> bool:
        """Whether ``scheduled`` sparsity removes at least one more channel than now.

        With a MACs target every step runs a search, so before the ramp's end (``final``
        False, batch granularity) it waits until a point of MACs is due.
        """
        if scheduled <= self.sparsity + 1e-9:
            return False
        if self.target_macs_reduction is not None:
            return final or scheduled - self.sparsity >= _MACS_STEP
        if not self.widths:
            return True
        if self.global_pruning:
            total = sum(self.original_widths.get(n, w) for n, w in self.widths.items())
            return kept_channels(total, scheduled) < sum(self.widths.values())
        return any(kept_channels(self.original_widths.get(n, w), scheduled, self.round_to) < w
                   for n, w in self.widths.items())

    def _ignored(self, student: nn.Module) -> list[str]:
        names = resolve_layer_names(student, self.ignore_layers, "prune.ignore_layers")
        output = output_layer_name(student)
        return names + ([output] if output and output not in names else [])

    def _select(self, student: nn.Module, example: torch.Tensor, scores: dict, target: float):
        """A plan reaching ``target`` (channel sparsity, or MACs share by bisection)."""
        select = lambda s: select_channels(  # noqa: E731
            scores, self.original_widths, s, self.global_pruning, self.round_to)
        if self.target_macs_reduction is None:
            return select(target), target
        goal = self.original_macs * (1.0 - target)

        def macs_of(plan: Plan) -> int:
            probe = copy.deepcopy(student)
            apply_plan(probe, example, plan)
            return count_macs_params(probe, example)[0]

        lo, hi = self.channel_sparsity, _MAX_CHANNEL_SPARSITY
        if macs_of(select(hi)) > goal:
            rank_zero_warn(f"MACs reduction {target:.2f} is out of reach of channel pruning "
                           f"up to {hi:.2f} (ignored layers are kept); pruning {hi:.2f}")
            return select(hi), hi
        for _ in range(_SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if macs_of(select(mid)) <= goal else (mid, hi)
        return select(hi), hi

    def decide(self, student: nn.Module, example: torch.Tensor, target: float,
               batch: Any = None) -> dict[str, Any]:
        """Which channels go to reach ``target``: a plan of plain values (broadcastable).

        Scores a copy of the student (``taylor`` overwrites gradients); the first call records
        the original widths (and MACs) that later targets are measured against.
        """
        work = copy.deepcopy(student)
        scores = score_channels(work, example, self.importance, self._ignored(student), batch)
        if not self.original_widths:
            self.original_widths = {n: len(s) for n, s in scores.items()}
            self.original_macs = count_macs_params(student, example)[0]
        plan, channel_sparsity = self._select(student, example, scores, target)
        return {"plan": plan, "channel_sparsity": channel_sparsity,
                "original_widths": self.original_widths, "original_macs": self.original_macs}

    # ----- effect ----------------------------------------------------------------------------
    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        example = getattr(pl_module, "example_input", None)
        if example is None:
            shape = getattr(trainer.datamodule, "input_shape", None)
            if shape is None:
                raise UserError("structured pruning needs pl_module.example_input or "
                                "trainer.datamodule.input_shape to trace the student")
            example = torch.zeros(1, *shape)
        device = next(pl_module.student.parameters()).device
        return example.to(device)

    def _taylor_batch(self, trainer: pl.Trainer, batch: Any) -> Any:
        if self.importance != "taylor":
            return None
        batch = batch if batch is not None else self._last_batch
        if batch is None and trainer.datamodule is not None:
            batch = next(iter(trainer.datamodule.train_dataloader()))
        return batch

    def _rewrap_ddp(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        if isinstance(trainer.strategy, DDPStrategy):
            # The DDP reducer holds the old parameters: wrap the pruned module again.
            trainer.strategy.model = trainer.lightning_module
            trainer.strategy.configure_ddp()

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float,
              batch: Any = None) -> Plan:
        """Decide on rank 0, broadcast, apply everywhere, rebuild optimizer and adapters."""
        student = pl_module.student
        example = self._example_input(trainer, pl_module)
        decision = None
        if trainer.is_global_zero:
            decision = self.decide(student, example, target, self._taylor_batch(trainer, batch))
        decision = trainer.strategy.broadcast(decision, src=0)
        self.original_widths = dict(decision["original_widths"])
        self.original_macs = decision["original_macs"]
        plan = [(name, list(idxs)) for name, idxs in decision["plan"]]
        if plan:
            snapshot = OptimizerSnapshot(trainer, pl_module)
            index = apply_plan(student, example, plan)
            prefix = next(n for n, m in pl_module.named_modules() if m is student)
            index = {f"{prefix}.{k}" if prefix else k: v for k, v in index.items()}
            if hasattr(pl_module, "rebuild_adapters"):
                pl_module.rebuild_adapters()
            self._rewrap_ddp(trainer)
            trainer.strategy.setup_optimizers(trainer)
            snapshot.restore(trainer, pl_module, index)
        self._record(student, example, target, decision["channel_sparsity"], trainer)
        return plan

    def _record(self, student: nn.Module, example: torch.Tensor, target: float,
                channel_sparsity: float, trainer: pl.Trainer) -> None:
        self.sparsity = target
        self.channel_sparsity = max(self.channel_sparsity, channel_sparsity)
        roots = {n: student.get_submodule(n) for n in self.original_widths}
        self.widths = {n: int(getattr(m, "out_channels", None) or m.out_features)
                       for n, m in roots.items()}
        macs, params = count_macs_params(student, example)
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                 "sparsity": target, "channel_sparsity": self.channel_sparsity,
                 "macs": macs, "params": params}
        self.history.append(entry)
        rank_zero_info(f"[StructuredPruning] epoch {entry['epoch']}: sparsity {target:.3f} "
                       f"(channels {self.channel_sparsity:.3f}), params {params:,}, "
                       f"MACs {macs:,} ({macs / self.original_macs:.1%} of original)")

    # ----- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "student", None), nn.Module):
            raise UserError("StructuredPruning needs a LightningModule with a `student` module")
        self._ignored(pl_module.student)  # unknown layer names fail before training starts

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: float,
              batch: Any = None) -> None:
        scheduled = self.schedule(t)
        if self.due(scheduled, final=self.granularity == "epoch" or t >= self.end_epoch):
            if isinstance(pl_module.student, torch.fx.GraphModule):
                raise UserError(f"structured pruning is due at epoch {t:g} but the student is "
                                "already a quantized graph: end pruning before QAT starts "
                                "(prune.end_epoch < qat.start_epoch)")
            self.prune(trainer, pl_module, scheduled, batch)
        elif scheduled > self.sparsity:
            self.sparsity = scheduled  # reached without removing a channel (integer widths)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.granularity == "epoch":
            self._step(trainer, pl_module, float(trainer.current_epoch))
        pl_module.log("prune/sparsity", self.sparsity, on_step=False, on_epoch=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.importance == "taylor":
            self._last_batch = batch
        if self.granularity == "batch":
            self._step(trainer, pl_module, batch_step(trainer, batch_idx), batch)

    # ----- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "channel_sparsity": self.channel_sparsity,
                "original_widths": dict(self.original_widths), "widths": dict(self.widths),
                "original_macs": self.original_macs, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self.channel_sparsity = float(state_dict["channel_sparsity"])
        self.original_widths = dict(state_dict["original_widths"])
        self.widths = dict(state_dict["widths"])
        self.original_macs = state_dict["original_macs"]
        self.history = list(state_dict["history"])
