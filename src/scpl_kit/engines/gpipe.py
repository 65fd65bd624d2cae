"""GPipe for end-to-end methods: the one unit's blocks split into stages, one process per stage,
each mini-batch cut into M micro-batches that flow through PyTorch's own pipeline schedules
(torch.distributed.pipelining: ScheduleGPipe, or Schedule1F1B). Gradients of the micro-batches are
accumulated (averaged through each micro-batch's loss, divided by M) and every stage's updater steps
once per mini-batch (the run's optimizer, clipping on the norm over all stages, bf16 if asked).
M = 1 is naive model parallelism: the "BP on K devices" baseline. Unless `stages` are given, the
blocks are split by their measured forward+backward times (`balance: time`), as the pipeline engine
splits its units.

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=gpipe method=bp engine.microbatches=4
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from scpl_kit.engines import ENGINES
from scpl_kit.engines.balance import check_stages, time_chain
from scpl_kit.engines.base import Batch, Engine, as_signal, reports_peer_failures
from scpl_kit.engines.distributed import gather_to_main
from scpl_kit.engines.staged import Segment, StagedEngine, wait_sent
from scpl_kit.engines.transport import tensor_bytes
from scpl_kit.methods.units import LocalUnit, Network, NonFiniteLossError, moved
from scpl_kit.models.base import run_block
from scpl_kit.signal import LABELS, Signal, summary, without_summary
from scpl_kit.updater import UpdateRecipe

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}  # classes of torch.distributed.pipelining


class StageModule(nn.Module):
    """One stage's blocks (and, on the last stage, the predictor) as torch.distributed.pipelining wants a
    stage: positional tensors in and out. The signal's tensors travel in `keys` order (an image batch is
    its features alone; a text batch adds its lengths), so blocks that read the whole signal work here too."""

    def __init__(self, blocks: list[nn.Module], predictor: nn.Module | None, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.blocks, self.predictor, self.keys = nn.ModuleList(blocks), predictor, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        signal = dict(zip(self.keys, tensors, strict=True))
        for block in self.blocks:
            signal = run_block(block, without_summary(signal))
        if self.predictor is not None:
            return self.predictor(summary(signal))
        out = tuple(signal[key] for key in self.keys)
        return out if len(out) > 1 else out[0]


def block_step_times(network: Network, example: Signal, device: torch.device, microbatches: int) -> list[float]:
    """Seconds of each block's forward and backward on one micro-batch of `example`, each block fed the
    one before's output, run as a one-block StageModule (the predictor joins the last block, as it
    joins the last stage). A stand-in loss (the output's sum): the real one's cost is the head's,
    small beside a block's. Timed on copies, as `unit_step_times` does, so the model does not change."""
    size = max(1, len(example[LABELS]) // microbatches)
    signal = {key: tensor[:size] for key, tensor in example.items() if key != LABELS}
    keys, last = tuple(signal), len(network.blocks) - 1

    def trials() -> Iterator[Callable[[Signal], Signal]]:
        for i, block in enumerate(network.blocks):
            stage = StageModule([copy.deepcopy(block)], copy.deepcopy(network.predictor) if i == last else None, keys).to(device).train()

            def step(signal: Signal, stage: StageModule = stage, i: int = i) -> Signal:
                # A later stage also sends its input's gradient back, so it is part of the time.
                inputs = [t.detach().requires_grad_(i > 0 and t.is_floating_point()) for t in signal.values()]
                out = stage(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                if outs[0].requires_grad:
                    outs[0].float().sum().backward()
                return dict(zip(keys, (t.detach() for t in outs)))

            yield step

    return time_chain(trials(), moved(signal, device), device)


def padded_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`tensor` zero-padded at the end of every dim but the batch's up to `shape`. PyTorch's schedules
    learn the shapes a stage exchanges from the first micro-batch and keep them, while a loader may
    trim each batch (text batches end at their longest sequence); padding is what models mask anyway."""
    pad = [p for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:])) for p in (0, want - have)]
    return torch.nn.functional.pad(tensor, pad) if any(pad) else tensor


@ENGINES.register("gpipe")
class GPipeEngine(StagedEngine):
    """One end-to-end network (a unit whose `network()` describes it) split into stages; training
    goes through PyTorch's schedule. `stages` group the network's *blocks* (the predictor joins the last stage)."""

    def __init__(self, microbatches: int = 4, schedule: str = "gpipe", stages: list[list[int]] | None = None, balance: str = "time",
                 backend: str = "auto", device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        super().__init__(stages, balance, backend, device, timeout_s, processes)
        self.microbatches, self.schedule_name = microbatches, schedule

    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        network = units[0].network() if len(units) == 1 else None
        if network is None:
            raise ValueError(
                f"engine=gpipe pipelines one end-to-end network (method=bp); this method gives {len(units)} units. "
                "Decoupled methods run across processes with engine=pipeline."
            )
        (self.unit,) = units
        self.network = network
        n_blocks = len(network.blocks)
        measure = (lambda: block_step_times(network, example, self.device, self.microbatches)) if example is not None else None
        self.stages = self.stages or self.split(n_blocks, "blocks", measure)
        check_stages(self.stages, n_blocks, self.world, "blocks")
        self.units = [self.unit.to(self.device)]
        self.example = network.example  # the names and full shapes of what enters every stage
        self.stage_module = StageModule([network.blocks[i] for i in self.stages[self.rank]], network.predictor if self.is_last else None, tuple(self.example))
        # The unit's state entries this stage owns: those holding the stage module's tensors.
        owned = {id(t) for t in self.stage_module.state_dict(keep_vars=True).values()}
        self.own_keys = {k for k, t in self.unit.state_dict(keep_vars=True).items() if id(t) in owned}
        self.chunks: list[tuple[int, int]] = []  # (bytes forward, bytes backward) of each forward call in a step
        self.stage_module.register_forward_hook(self._note_activations)
        # Imported here: it loads torch._dynamo (a second per process), which no other engine needs.
        from torch.distributed import pipelining

        stage = pipelining.PipelineStage(self.stage_module, self.rank, self.world, self.device)
        schedule = getattr(pipelining, SCHEDULES[self.schedule_name])
        # scale_grads=False: `_loss` divides each micro-batch's loss instead, so that gradients the
        # updater accumulates over batches are not divided again by the next schedule step.
        self.schedule = schedule(stage, self.microbatches, loss_fn=self._loss, scale_grads=False)
        # Over the whole unit on every stage: the optimizers skip parameters without gradients, so each
        # process updates exactly its stage; clipping sums the squared norm over the stages.
        self.attach_updaters(recipe, norm_group=dist.group.WORLD if self.world > 1 else None)

    def _note_activations(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        """What the schedule sends for a micro-batch (torch.distributed.pipelining sends it; the
        transport counts it in `train_batch`): the stage's output forward, its input's gradient backward."""
        if module.training:
            outputs = output if isinstance(output, tuple) else (output,)
            self.chunks.append((0 if self.is_last else tensor_bytes(outputs), 0 if self.is_first else tensor_bytes(t for t in inputs if t.is_floating_point())))

    @property
    def loss_share(self) -> int:
        """What a micro-batch's loss is divided by: the mean over the micro-batches and the batches accumulated."""
        return self.microbatches * self.updaters[0].settings.accumulate

    def _loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.network.loss(scores, labels) / self.loss_share

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The last stage computes the loss, so the first one sends it each batch's labels."""
        if self.world == 1:
            return labels
        if self.is_first:
            wait_sent(self.pending)  # the previous batch's labels
            for tensor in (torch.tensor([labels.numel()], device=self.device), labels.to(self.device)):
                self.pending.append(self.transport.isend(tensor, self.world - 1))
            return None
        if self.is_last:
            size = torch.empty(1, dtype=torch.int64, device=self.device)
            self.transport.recv(size, 0)
            received = torch.empty(int(size), dtype=torch.int64, device=self.device)
            self.transport.recv(received, 0)
            return received
        return None

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        """The first stage reads the data (its labels go to the last); the others' inputs come
        through the schedule."""
        if self.is_first:
            for batch in batches:
                signal = as_signal(batch)
                yield signal, len(signal[LABELS])
        else:
            for _ in range(len(batches)):  # type: ignore[arg-type]
                yield {}, 0

    def train_batch(self, signal: Signal) -> dict[str, torch.Tensor]:
        target = self._labels(signal.pop(LABELS, None))
        updater = self.updaters[0]
        updater.zero_grad()
        losses: list[torch.Tensor] = []
        args = tuple(padded_to(signal[key], self.example[key].shape).to(self.device) for key in self.example) if self.is_first else ()
        self.chunks.clear()
        with updater.autocast():
            self.schedule.step(*args, target=target, losses=losses)  # forward and backward of every micro-batch
        # The last M forwards are the micro-batches'; the first step's schedule also runs one forward
        # of its own first, to infer the shapes it exchanges, and sends only those shapes.
        for forward, backward in self.chunks[-self.microbatches:]:
            self.transport.count(forward, [self.rank + 1])
            self.transport.count(backward, [self.rank - 1])
        updater.finish_step()
        updater.steps += 1
        if not self.is_last:
            return {}
        # Equal micro-batches: the mini-batch's mean loss (undoing `_loss`'s division).
        loss = torch.stack(losses).sum().detach().float() * updater.settings.accumulate
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self.unit.name, self.network.loss_name, updater.steps, loss.item())
        return {self.network.loss_name: loss}

    def segments(self) -> list[Segment]:
        """Inference is the stages in rank order, each its share of the network (the last one ends in class scores)."""
        def own(signal: Signal) -> Signal:
            out = self.stage_module(*(signal[key] for key in self.example))
            return dict(zip(self.example, out if isinstance(out, tuple) else (out,)))

        return [(rank, [own] if rank == self.rank else []) for rank in range(self.world)]

    def local_modules(self) -> list[nn.Module]:
        return [self.stage_module]  # this stage's share of the unit

    @reports_peer_failures
    def training_state(self) -> list[dict[str, Any]]:
        """The one unit's state, merged on the main rank from the parts each stage owns; [] elsewhere."""
        (state,) = Engine.training_state(self)  # this process's view of the one unit
        mine = {
            "module": {k: v for k, v in state["module"].items() if k in self.own_keys},
            "optimizer_state": state["optimizer"]["state"],  # only this stage's parameters ever stepped
        }
        gathered = gather_to_main(mine)
        if not gathered:
            return []
        state["module"] = {k: v for part in gathered for k, v in part["module"].items()}
        state["optimizer"]["state"] = {k: v for part in gathered for k, v in part["optimizer_state"].items()}
        return [state]
