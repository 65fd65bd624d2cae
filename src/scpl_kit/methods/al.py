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
BRIDGE_INPUTS = ("pooled", "flat")
VARIANTS = ("vision", "text")


class PoolInput:
    """The feature map that entered a block's global pooling in its last forward (a forward pre-hook):
    what a `flat` bridge reads, as the SCPL authors' AL reads ResNet-18's 512·4·4 map before pooling."""

    def __init__(self, pool: nn.Module) -> None:
        self.map: torch.Tensor | None = None
        pool.register_forward_pre_hook(self.keep)

    def keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.map = args[0]


def final_pooling(block: nn.Module) -> nn.Module | None:
    """The global average pooling a block ends with (the kit's ResNets' last block), if it has one."""
    pools = [m for m in block.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    return pools[-1] if pools else None


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
                 num_classes: int, is_last: bool, label_lr_scale: float = 2.0, pool_input: PoolInput | None = None,
                 decode_labels: bool = False) -> None:
        """`pool_input`: the bridge reads the map before the block's global pooling (flat), else its output.
        `decode_labels`: this (first) block's inverse is trained with cross-entropy against the labels
        instead of the MSE against their one-hot code (the AL authors' text code)."""
        super().__init__(name, encoder)
        self.pool_input, self.decode_labels = pool_input, decode_labels
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
        # One-hot by comparison: F.one_hot checks the labels' range on the host first (on the CPU it reads them).
        code_in = signal[CODE] if CODE in signal else (signal[LABELS][:, None] == torch.arange(self.num_classes, device=signal[LABELS].device)).to(self.bridge_dtype)
        out = run_block(self.body, signal)  # engines hand inputs on detached: f_k's input is sg(x_k)
        code = self.label_encoder(code_in.detach())
        # What the bridge reads rides with the step's inputs, which are never handed on.
        return UnitStep({**signal, CODE: code_in, BRIDGED: self.bridge_input(out)}, {**out, CODE: code})

    def bridge_input(self, out: Signal) -> torch.Tensor:
        return self.pool_input.map if self.pool_input is not None else summary(out)

    def local_losses(self, step: UnitStep) -> dict[str, torch.Tensor]:
        features, code, code_in = step.inputs[BRIDGED], step.outputs[CODE], step.inputs[CODE]
        decoded = self.inverse(code)
        inverse = (f"{self.name}/inverse_ce", F.cross_entropy(decoded, step.inputs[LABELS])) if self.decode_labels else (
            f"{self.name}/inverse_mse", F.mse_loss(decoded, code_in.detach()))
        return {f"{self.name}/bridge_mse": F.mse_loss(self.bridge(features), code.detach()), inverse[0]: inverse[1]}

    def infer(self, signal: Signal, phase: str = "forward") -> Signal:
        """forward: the encoder, and the bridge's guess of t_k set aside. back: that guess joins the
        codes already decoding (from the blocks after this one) and h_k maps them all one level down.
        After h_1 every `exit/block<j>` is block j's readout, and `scores` is the last block's."""
        if phase == "forward":
            out = run_block(self.body, signal)
            return {**without_summary(out), BRIDGED + self.name: self.bridge(self.bridge_input(out))}
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
             label_lr_scale: float = 2.0, init: str = "he", bridge_input: str = "pooled", variant: str = "vision") -> list[AssociatedUnit]:
    """Paper sizes: bridge Flatten → Linear(·, 2500) → Sigmoid → Linear(2500, 500) → Sigmoid; label
    codes of 500 (Linear + Sigmoid encoders and inverses). `init`: he | default (`sigmoid_layer`).
    `bridge_input`: pooled = what the block hands on; flat = a block that ends in global pooling (a
    ResNet's last) gives its bridge the flattened map before the pooling.
    `variant: text` builds the layers as the AL authors' text code (github.com/Hibb-bb/AL,
    distributed_model.py; Wu et al., ICLR 2022): bridge one Linear(·, code_dim) + Tanh (bridge_hidden
    unused), label encoders Linear + Tanh, inverses Linear (+ Tanh on the first block's, which is
    trained with cross-entropy on the labels), PyTorch's initialisation (init unused)."""
    if init not in INITS:
        raise ValueError(f"method.init={init!r}; valid: {', '.join(INITS)}")
    if variant not in VARIANTS:
        raise ValueError(f"method.variant={variant!r}; valid: {', '.join(VARIANTS)}")
    if bridge_input not in BRIDGE_INPUTS:
        raise ValueError(f"method.bridge_input={bridge_input!r}; valid: {', '.join(BRIDGE_INPUTS)}")
    check_decouplable("al", model)
    pools = [final_pooling(block) if bridge_input == "flat" else None for block in model.blocks]
    pool_inputs = [PoolInput(pool) if pool is not None else None for pool in pools]
    shapes = model.block_output_shapes()  # its dummy forward also leaves each pooling's input map
    shapes = [tuple(p.map.shape[1:]) if p is not None else shape for p, shape in zip(pool_inputs, shapes)]
    units, last = [], len(model.blocks) - 1
    for k, (block, shape) in enumerate(zip(model.blocks, shapes)):
        code_in = num_classes if k == 0 else code_dim
        features = int(torch.Size(shape).numel())
        if variant == "text":
            bridge = nn.Sequential(nn.Flatten(), nn.Linear(features, code_dim), nn.Tanh())
            encoder = nn.Sequential(nn.Linear(code_in, code_dim), nn.Tanh())
            inverse = nn.Sequential(nn.Linear(code_dim, code_in), nn.Tanh()) if k == 0 else nn.Linear(code_dim, code_in)
        else:
            layer = functools.partial(sigmoid_layer, init=init)
            bridge = nn.Sequential(nn.Flatten(), layer(features, bridge_hidden), layer(bridge_hidden, code_dim))
            encoder, inverse = layer(code_in, code_dim), layer(code_dim, code_in)
        units.append(AssociatedUnit(
            f"block{k + 1}", block, bridge, encoder, inverse, num_classes, k == last, label_lr_scale, pool_inputs[k],
            decode_labels=variant == "text" and k == 0,
        ))
    return units
