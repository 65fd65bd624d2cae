"""LocalUnit: what a method turns a model into, and the only thing an engine moves batches between.

A unit owns some blocks (its `body`), an optional local head that gives those blocks their loss,
an optional predictor trained on the unit's detached output, and one optimizer over all of it.
Its output is handed on *detached*, so no gradient ever crosses from one unit to the one before.

Losses are named `<where>/<loss>`: `block2/supcon` for a block's local loss, `predictor/ce` for the
classifier's cross-entropy, whichever method trains it, so charts of different methods overlay.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], tuple[torch.optim.Optimizer, Any]]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the unit (block) and the step."""

    def __init__(self, unit: str, loss_name: str, step: int, value: float) -> None:
        super().__init__(
            f"non-finite {loss_name} loss ({value}) in {unit} at step {step}; "
            "lower the learning rate or check the inputs. Metrics logged so far are kept."
        )
        self.unit, self.loss_name, self.step = unit, loss_name, step


class LocalUnit(nn.Module):
    def __init__(
        self, name: str, body: nn.Module, head: nn.Module | None = None, predictor: nn.Module | None = None,
        head_scope: str | None = None,
    ) -> None:
        """`head_scope`: where the head's loss is filed (default: the unit's name). BP's head is the
        end-to-end cross-entropy on the predictor's output, so BP files it under `predictor`."""
        super().__init__()
        self.name = name
        self.head_scope = head_scope or name
        self.body = body
        self.head = head
        self.predictor = predictor
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.steps = 0

    def configure_optimizer(self, make: OptimizerFactory) -> None:
        self.optimizer, self.scheduler = make(self.parameters())

    def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inference: the body, then the predictor if this unit has one. Projectors are unused."""
        out = self.body(inputs)
        return self.predictor(out) if self.predictor is not None else out

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward, local loss, backward and one optimizer step. Returns (detached output, losses)."""
        out = self.forward_train(inputs)
        return out.detach(), self.learn(out, labels)

    def forward_train(self, inputs: torch.Tensor) -> torch.Tensor:
        """The body's forward, keeping the graph for `learn`. Engines that overlap one unit's
        backward with the next unit's forward call the two halves separately."""
        return self.body(inputs)

    @property
    def head_loss_name(self) -> str:
        return f"{self.head_scope}/{self.head.loss_name}"

    def learn(self, out: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Local loss on `out` (from forward_train), backward and one optimizer step."""
        losses: dict[str, torch.Tensor] = {}
        if self.head is not None:
            losses[self.head_loss_name] = self.head(out, labels)
        if self.predictor is not None:
            # The predictor learns from a detached copy, so its gradient never reaches the backbone.
            losses["predictor/ce"] = F.cross_entropy(self.predictor(out.detach()), labels)
        self.steps += 1
        for loss_name, loss in losses.items():
            if not torch.isfinite(loss):
                raise NonFiniteLossError(self.name, loss_name, self.steps, loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {name: loss.detach() for name, loss in losses.items()}

    def training_state(self) -> dict[str, Any]:
        """Everything needed to resume this unit: weights, optimizer, schedule and step count."""
        return {
            "module": self.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "steps": self.steps,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
