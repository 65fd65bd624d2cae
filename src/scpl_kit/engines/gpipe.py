"""BP's pipelines: the one end-to-end network's blocks split into stages over the processes, each
mini-batch cut into M micro-batches that flow through one of PyTorch's own pipeline schedules
(torch.distributed.pipelining), `engine.schedule`, with the bubble model's idle share (K processes,
M micro-batches; transfers aside):

    gpipe             every micro-batch forward, then every backward          (K−1)/(M+K−1)
    1f1b              one forward, one backward, in turn (less memory)        (K−1)/(M+K−1)
    interleaved_1f1b  2 stages per process, looped (rank r: stages r, r+K)    (K−1)/(2M+K−1)
    zero_bubble       interleaved, input and weight gradients apart           about 0: weight gradients fill it
    zbv               2 stages per process in a V (rank r: r and 2K−1−r)      about 0

Gradients of the micro-batches are accumulated (each micro-batch's loss divided by M) and every
stage's updater steps once per mini-batch (the run's optimizer, clipping on the norm over all
stages, bf16 if asked). M = 1 with `gpipe` is naive model parallelism: the "BP on K devices"
baseline. Unless `stages` are given, the blocks are split by their measured forward+backward times
(`balance: time`), as the pipeline engine splits its units. The network comes from the unit
(`LocalUnit.network()`), with activation checkpointing when the method asks for it (BP's `checkpoint`).

    torchrun --nproc-per-node 2 -m scpl_kit.train engine=gpipe method=bp engine.microbatches=4 engine.schedule=zbv
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from scpl_kit.devices import DeviceError
from scpl_kit.engines import ENGINES
from scpl_kit.engines.balance import check_stages, time_chain
from scpl_kit.engines.base import Batch, Engine, as_signal, reports_peer_failures
from scpl_kit.engines.distributed import gather_to_main
from scpl_kit.engines.staged import Segment, StagedEngine, wait_sent
from scpl_kit.engines.transport import tensor_bytes
from scpl_kit.methods.units import LocalUnit, Network
from scpl_kit.models.base import run_blocks
from scpl_kit.signal import LABELS, Signal, moved, summary
from scpl_kit.updater import UpdateRecipe

# engine.schedule -> (class of torch.distributed.pipelining, stages per process, how stages map to processes)
log = logging.getLogger(__name__)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
}


def stage_owner(stage: int, processes: int, style: str) -> int:
    """The process that holds pipeline stage `stage`: looped (stage s on process s mod K), or in a V
    (out to the last process and back: stages K−1 and K on the same one), as torch's schedules place them."""
    turn, position = divmod(stage, processes)
    return position if style == "loop" or turn % 2 == 0 else processes - 1 - position


def idle_share(schedule: str, processes: int, microbatches: int) -> float:
    """The bubble model's share of a step each process waits (transfers aside): (K−1)/(vM+K−1) for v
    stages per process; the zero-bubble schedules fill the bubble with weight gradients (about 0)."""
    name, per_process, _ = SCHEDULES[schedule]
    if "ZeroBubble" in name:
        return 0.0
    return (processes - 1) / (per_process * microbatches + processes - 1)


class StageModule(nn.Module):
    """One stage's blocks (and, on the last stage, the predictor) as torch.distributed.pipelining wants a
    stage: positional tensors in and out. The signal's tensors travel in `keys` order (an image batch is
    its features alone; a text batch adds its lengths), so blocks that read the whole signal work here too."""

    def __init__(self, blocks: list[nn.Module], predictor: nn.Module | None, keys: tuple[str, ...], checkpoint: bool = False) -> None:
        super().__init__()
        self.blocks, self.predictor, self.keys, self.checkpoint = nn.ModuleList(blocks), predictor, keys, checkpoint

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        signal = run_blocks(self.blocks, dict(zip(self.keys, tensors, strict=True)), self.checkpoint)
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
    """One end-to-end network (a unit whose `network()` describes it) split into stages; training goes
    through PyTorch's schedule. `stages` group the network's *blocks* into K·v pipeline stages (v per
    process; the predictor joins the last)."""

    def __init__(self, microbatches: int = 4, schedule: str = "gpipe", stages: list[list[int]] | None = None, balance: str = "time",
                 backend: str = "auto", device: str = "auto", timeout_s: float = 300.0, processes: int | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        super().__init__(stages, balance, backend, device, timeout_s, processes)
        if self.transport.via_host and self.world > 1:
            raise DeviceError(
                "engine=gpipe: torch.distributed.pipelining sends CUDA tensors between processes, which gloo cannot carry; "
                "give each process a GPU of its own (engine.device=auto engine.backend=auto: NCCL), or run on the CPU"
            )
        self.microbatches, self.schedule_name = microbatches, schedule
        _, per_process, self.style = SCHEDULES[schedule]
        self.n_pipeline_stages = per_process * self.world
        self.owner = [stage_owner(s, self.world, self.style) for s in range(self.n_pipeline_stages)]
        self.mine = [s for s in range(self.n_pipeline_stages) if self.owner[s] == self.rank]  # this process's stages, in order
        self.loss_rank = self.owner[-1]  # the process that holds the last stage computes the loss

    def ideal_speedup(self, times: list[float]) -> float:
        """Over BP on one worker at the micro-batch size: the blocks' total ÷ the busiest process's share
        (its stages' blocks), times the share of a step the bubble model leaves it working."""
        loads = [0.0] * self.world
        for stage, blocks in enumerate(self.stages):
            loads[self.owner[stage]] += sum(times[i] for i in blocks)
        return sum(times) / max(loads) * (1 - idle_share(self.schedule_name, self.world, self.microbatches))

    def epoch_stats(self) -> dict[str, float]:
        return {**super().epoch_stats(), "plan/idle_share": idle_share(self.schedule_name, self.world, self.microbatches)}

    def setup(self, units: list[LocalUnit], example: Signal | None = None, recipe: UpdateRecipe | None = None) -> None:
        network = units[0].network() if len(units) == 1 else None
        if network is None:
            raise ValueError(
                f"engine=gpipe pipelines one end-to-end network (method=bp); this method gives {len(units)} units. "
                "Decoupled methods run across processes with engine=pipeline."
            )
        (self.unit,) = units
        self.network = network
        n_blocks, n_stages = len(network.blocks), self.n_pipeline_stages
        if n_blocks < n_stages:
            raise ValueError(
                f"engine.schedule={self.schedule_name} on {self.world} processes needs {n_stages} pipeline stages, but the network "
                f"has {n_blocks} blocks: cut it into more (method.modules={n_stages}) or choose a schedule with one stage per process"
            )
        measure = (lambda: block_step_times(network, example, self.device, self.microbatches)) if example is not None else None
        self.stages = self.stages or self.split(n_blocks, "blocks", measure, groups=n_stages)
        check_stages(self.stages, n_blocks, n_stages, "blocks")
        if self.is_main:
            log.info("schedule %s: stages %s on %d processes, %d micro-batches; the bubble model idles each process %.0f%% of a step",
                     self.schedule_name, self.stages, self.world, self.microbatches, 100 * idle_share(self.schedule_name, self.world, self.microbatches))
        self.units = [self.unit.to(self.device)]
        self.example = network.example  # the names and full shapes of what enters every stage
        keys = tuple(self.example)
        self.stage_modules = {
            s: StageModule([network.blocks[i] for i in self.stages[s]], network.predictor if s == n_stages - 1 else None, keys, network.checkpoint)
            for s in self.mine
        }
        # The unit's state entries this process owns: those holding its stage modules' tensors.
        owned = {id(t) for module in self.stage_modules.values() for t in module.state_dict(keep_vars=True).values()}
        self.own_keys = {k for k, t in self.unit.state_dict(keep_vars=True).items() if id(t) in owned}
        # (bytes forward, bytes backward) of each forward call of each stage in a step: what the schedule sends.
        self.chunks: dict[int, list[tuple[int, int]]] = {s: [] for s in self.mine}
        for s, module in self.stage_modules.items():
            module.register_forward_hook(functools.partial(self._note_activations, s))
        # Imported here: it loads torch._dynamo (a second per process), which no other engine needs.
        from torch.distributed import pipelining

        stages = [pipelining.PipelineStage(module, s, n_stages, self.device) for s, module in self.stage_modules.items()]
        schedule = getattr(pipelining, SCHEDULES[self.schedule_name][0])
        # scale_grads=False: `_loss` divides each micro-batch's loss instead, so that gradients the
        # updater accumulates over batches are not divided again by the next schedule step.
        self.schedule = schedule(stages if len(stages) > 1 else stages[0], self.microbatches, loss_fn=self._loss, scale_grads=False)
        # Over the whole unit on every process: the optimizers skip parameters without gradients, so each
        # process updates exactly its stages; clipping sums the squared norm over the processes.
        self.attach_updaters(recipe, norm_group=dist.group.WORLD if self.world > 1 else None)

    def _note_activations(self, stage: int, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        """What the schedule sends for a micro-batch through `stage` (torch.distributed.pipelining sends
        it; `train_batch` counts it): its output forward, its input's gradient backward."""
        if module.training:
            outputs = output if isinstance(output, tuple) else (output,)
            last, first = stage == self.n_pipeline_stages - 1, stage == 0
            self.chunks[stage].append((0 if last else tensor_bytes(outputs), 0 if first else tensor_bytes(t for t in inputs if t.is_floating_point())))

    @property
    def loss_share(self) -> int:
        """What a micro-batch's loss is divided by: the mean over the micro-batches and the batches accumulated."""
        return self.microbatches * self.updaters[0].settings.accumulate

    def _loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.network.loss(scores, labels) / self.loss_share

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The process with the last stage computes the loss, so the first one sends it each batch's labels."""
        if self.loss_rank == 0:
            return labels if self.rank == 0 else None
        if self.rank == 0:
            wait_sent(self.pending)  # the previous batch's labels
            for tensor in (torch.tensor([labels.numel()], device=self.device), labels.to(self.device)):
                self.pending.append(self.transport.isend(tensor, self.loss_rank))
            return None
        if self.rank == self.loss_rank:
            size = torch.empty(1, dtype=torch.int64, device=self.device)
            self.transport.recv(size, 0)
            received = torch.empty(int(size), dtype=torch.int64, device=self.device)
            self.transport.recv(received, 0)
            return received
        return None

    def batches_here(self, batches: Iterable[Batch]) -> Iterator[tuple[Signal, int]]:
        """The first process reads the data (its labels go to the one with the last stage); the
        others' inputs come through the schedule."""
        if self.rank == 0:
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
        args = tuple(padded_to(signal[key], self.example[key].shape).to(self.device) for key in self.example) if self.rank == 0 else ()
        for chunks in self.chunks.values():
            chunks.clear()
        with updater.autocast():
            self.schedule.step(*args, target=target, losses=losses)  # forward and backward of every micro-batch
        # Each stage's last M forwards are the micro-batches'; the first step's schedule also runs one
        # forward of its own first, to infer the shapes it exchanges, and sends only those shapes.
        for s, chunks in self.chunks.items():
            for forward, backward in chunks[-self.microbatches:]:
                if s + 1 < self.n_pipeline_stages:
                    self.transport.count(forward, [self.owner[s + 1]])
                if s > 0:
                    self.transport.count(backward, [self.owner[s - 1]])
        updater.finish_step()
        updater.steps += 1
        if self.rank != self.loss_rank:
            return {}
        # Equal micro-batches: the mini-batch's mean loss (undoing `_loss`'s division).
        loss = torch.stack(losses).sum().detach().float() * updater.settings.accumulate
        updater.watch.note({self.network.loss_name: loss}, updater.steps)
        return {self.network.loss_name: loss}

    def segments(self) -> list[Segment]:
        """Inference is the pipeline stages in order, each on its process (the last one ends in class
        scores); consecutive stages on one process are one segment."""
        segments: list[Segment] = []
        for s, owner in enumerate(self.owner):
            if not segments or segments[-1][0] != owner:
                segments.append((owner, []))
            if owner == self.rank:
                segments[-1][1].append(functools.partial(self._infer_stage, self.stage_modules[s]))
        return segments

    def _infer_stage(self, module: StageModule, signal: Signal) -> Signal:
        out = module(*(signal[key] for key in self.example))
        return dict(zip(self.example, out if isinstance(out, tuple) else (out,)))

    def local_modules(self) -> list[nn.Module]:
        return list(self.stage_modules.values())  # this process's share of the unit

    @reports_peer_failures
    def training_state(self) -> list[dict[str, Any]]:
        """The one unit's state, merged on the main rank from the parts each process owns; [] elsewhere."""
        (state,) = Engine.training_state(self)  # this process's view of the one unit
        mine = {
            "module": {k: v for k, v in state["module"].items() if k in self.own_keys},
            "optimizer_state": state["optimizer"]["state"],  # only this process's parameters ever stepped
        }
        gathered = gather_to_main(mine)
        if not gathered:
            return []
        state["module"] = {k: v for part in gathered for k, v in part["module"].items()}
        state["optimizer"]["state"] = {k: v for part in gathered for k, v in part["optimizer_state"].items()}
        return [state]
