"""Associated Learning (AL, methods.md §2): each block also learns an auto-encoder of the labels.

Block k has its encoder f_k (the model's block), a bridge b_k from the block's output to a label
code, a label encoder t_k = g_k(t_{k-1}) with t_0 = onehot(y), and an inverse h_k that decodes t_k
back to t_{k-1}. Its local loss is

    MSE(b_k(f_k(x_k)), sg(t_k)) + MSE(h_k(t_k), sg(t_{k-1}))

with the inputs of f_k and g_k detached (sg = stop-gradient). The label code travels between units
beside the activations, as the signal's `code`. Inference runs the encoders up to the last block,
its bridge, then the inverse chain h_K … h_1 back down to class scores, so every unit also has a
`back` phase. The model's own predictor is unused: AL's classifier is that inverse chain.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from scpl_kit.methods import METHODS, check_decouplable
from scpl_kit.methods.units import EXIT, SCORES, LocalUnit, UnitStep
from scpl_kit.models.base import BlockModel, run_block
from scpl_kit.signal import LABELS, Signal, summary, without_summary

CODE = "code"  # the label code t_k handed from block k to block k+1
BRIDGED = "al_bridge/"  # a block's bridge output, waiting for its own back phase to join the decoding


INITS = ("he", "default")


def sigmoid_layer(in_features: int, out_features: int, init: str = "he") -> nn.Sequential:
    """Linear + Sigmoid. init he: as Associated Learning's TensorFlow code (He-normal weights, zero
    bias; tensorflow_ver/ of github.com/4hfly/Associated_Learning); default: PyTorch's, as the SCPL
    authors' PyTorch AL (github.com/minyaho/scpl, model/ResNet.py).
    PyTorch's default init has ~2.4× smaller weights; through sigmoids that shrinks the label codes'
    spread between classes block after block, until t_4 is the same for every class (measured on the
    offline profile: across-class std 4e-5 after 3 epochs, every readout at chance)."""
    linear = nn.Linear(in_features, out_features)
    if init == "he":
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")  # std = sqrt(2 / in_features)
        nn.init.zeros_(linear.bias)
    return nn.Sequential(linear, nn.Sigmoid())


class AssociatedUnit(LocalUnit):
    phases = ("forward", "back")

    def __init__(self, name: str, encoder: nn.Module, bridge: nn.Module, label_encoder: nn.Module, inverse: nn.Module,
                 num_classes: int, is_last: bool, label_lr_scale: float = 2.0) -> None:
        super().__init__(name, encoder)
        self.bridge, self.label_encoder, self.inverse = bridge, label_encoder, inverse
        self.num_classes, self.is_last = num_classes, is_last
        # The label path (g_k, h_k) learns at `label_lr_scale` times the rate (LocalUnit.parameter_groups).
        self.label_encoder.lr_scale = self.inverse.lr_scale = label_lr_scale

    @property
    def bridge_dtype(self) -> torch.dtype:
        """The label path's floating type (float32 unless the model was cast)."""
        return next(self.label_encoder.parameters()).dtype

    def forward_train(self, signal: Signal) -> UnitStep:
        # The first block starts the label path from the labels themselves: t_0 = onehot(y).
        code_in = signal[CODE] if CODE in signal else F.one_hot(signal[LABELS], self.num_classes).to(self.bridge_dtype)
        out = run_block(self.body, signal)  # engines hand inputs on detached: f_k's input is sg(x_k)
        code = self.label_encoder(code_in.detach())
        return UnitStep({**signal, CODE: code_in}, {**out, CODE: code})

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        features, code, code_in = summary(step.outputs), step.outputs[CODE], step.inputs[CODE]
        return {
            f"{self.name}/bridge_mse": F.mse_loss(self.bridge(features), code.detach()),
            f"{self.name}/inverse_mse": F.mse_loss(self.inverse(code), code_in.detach()),
        }

    def infer(self, signal: Signal, phase: str = "forward") -> Signal:
        """forward: the encoder, and the bridge's guess of t_k set aside. back: that guess joins the
        codes already decoding (from the blocks after this one) and h_k maps them all one level down.
        After h_1 every `exit/block<j>` is block j's readout, and `scores` is the last block's."""
        if phase == "forward":
            out = run_block(self.body, signal)
            return {**without_summary(out), BRIDGED + self.name: self.bridge(summary(out))}
        out = dict(signal)
        guess = out.pop(BRIDGED + self.name)
        out[EXIT + self.name] = guess
        if self.is_last:
            out[SCORES] = guess
        for name in [n for n in out if n.startswith(EXIT) or n == SCORES]:
            out[name] = self.inverse(out[name])
        return out


@METHODS.register("al")
def build_al(model: BlockModel, num_classes: int, bridge_hidden: int = 2500, code_dim: int = 500,
             label_lr_scale: float = 2.0, init: str = "he") -> list[AssociatedUnit]:
    """Paper sizes: bridge Flatten → Linear(·, 2500) → Sigmoid → Linear(2500, 500) → Sigmoid; label
    codes of 500 (Linear + Sigmoid encoders and inverses). `init`: he | default (`sigmoid_layer`)."""
    if init not in INITS:
        raise ValueError(f"method.init={init!r}; valid: {', '.join(INITS)}")
    check_decouplable("al", model)
    units, last = [], len(model.blocks) - 1
    for k, (block, shape) in enumerate(zip(model.blocks, model.block_output_shapes())):
        code_in = num_classes if k == 0 else code_dim
        layer = functools.partial(sigmoid_layer, init=init)
        bridge = nn.Sequential(nn.Flatten(), layer(int(torch.Size(shape).numel()), bridge_hidden), layer(bridge_hidden, code_dim))
        units.append(AssociatedUnit(
            f"block{k + 1}", block, bridge, layer(code_in, code_dim), layer(code_dim, code_in), num_classes, k == last, label_lr_scale,
        ))
    return units
