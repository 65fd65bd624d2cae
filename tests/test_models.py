import inspect

import pytest
import torch
from torch import nn

from scpl_kit.config import compose_config
from scpl_kit.models import MODELS, ModelInputError, build_model
from scpl_kit.models.resnet import BasicBlock
from scpl_kit.train import options

CHANNELS = [64, 128, 256, 512]  # ResNet-18's stages


def resnet(shape=(3, 32, 32), classes=10, **options):
    torch.manual_seed(0)
    return build_model("resnet18", shape, classes, **options)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_resnet18_params(in_channels: int, channels: list[int], shortcut_kernel: int) -> int:
    """ResNet-18's blocks counted layer by layer: a bias-free k×k conv a→b has k²·a·b weights, a
    BatchNorm of b channels 2·b (scale and shift; running statistics are buffers)."""

    def conv_bn(a: int, b: int, kernel: int = 3) -> int:
        return kernel * kernel * a * b + 2 * b

    def basic(a: int, b: int) -> int:
        shortcut = conv_bn(a, b, shortcut_kernel) if a != b else 0  # every stage but the first strides
        return conv_bn(a, b) + conv_bn(b, b) + shortcut

    total = conv_bn(in_channels, channels[0])  # the stem
    previous = channels[0]
    for c in channels:
        total += basic(previous, c) + basic(c, c)
        previous = c
    return total


def test_resnet18_paper_shapes() -> None:
    model = resnet()
    assert len(model.blocks) == 4
    assert model.block_output_shapes() == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512,)]
    assert isinstance(model.predictor, nn.Linear)
    assert (model.predictor.in_features, model.predictor.out_features) == (512, 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_parameter_count() -> None:
    """3×3 strided shortcuts, as the paper's; with the usual 1×1 ones the same formula gives the
    11,173,962 parameters quoted for the standard CIFAR ResNet-18 (blocks plus Linear(512, 10))."""
    model = resnet()
    assert count(nn.ModuleList(model.blocks)) == expected_resnet18_params(3, CHANNELS, shortcut_kernel=3)
    assert expected_resnet18_params(3, CHANNELS, shortcut_kernel=1) + 512 * 10 + 10 == 11_173_962
    assert count(model.predictor) == 512 * 10 + 10


def test_resnet18_strided_shortcut_is_3x3_and_activations_leaky() -> None:
    model = resnet(width=0.125)
    first_of_stage2 = model.blocks[1][0]
    assert isinstance(first_of_stage2, BasicBlock)
    conv = first_of_stage2.shortcut[0]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1)) and conv.bias is None
    assert isinstance(model.blocks[0][0][3].shortcut, nn.Identity)  # layer 0 = stem + BasicBlock 64→64, stride 1: no conv
    kinds = {type(m) for m in model.modules()}
    assert nn.LeakyReLU in kinds and nn.ReLU not in kinds
    assert all(m.negative_slope == 0.01 for m in model.modules() if isinstance(m, nn.LeakyReLU))


def test_resnet18_width_scales_channels() -> None:
    model = resnet(width=0.125)
    assert [s[0] for s in model.block_output_shapes()] == [8, 16, 32, 64]
    assert model.predictor.in_features == 64
    assert count(nn.ModuleList(model.blocks)) == expected_resnet18_params(3, [8, 16, 32, 64], shortcut_kernel=3)


@pytest.mark.parametrize(("shape", "sides"), [((1, 28, 28), [28, 14, 7]), ((3, 8, 8), [8, 4, 2])])
def test_resnet18_takes_small_inputs(shape, sides) -> None:
    """Padding 1 everywhere, so a stride-2 conv halves a side rounding up; block 4 pools globally."""
    model = resnet(shape, width=0.125)
    assert model.block_output_shapes() == [(8, sides[0], sides[0]), (16, sides[1], sides[1]), (32, sides[2], sides[2]), (64,)]
    assert model(torch.randn(4, *shape)).shape == (4, 10)


@pytest.mark.parametrize("name", ["resnet18", "vgg"])
def test_built_model_is_in_training_mode(name) -> None:
    model = build_model(name, (3, 32, 32), 10, width=0.125)
    assert all(module.training for module in model.modules())
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.running_mean.abs().sum() == 0 and int(bn.num_batches_tracked) == 0


def test_resnet18_without_batchnorm() -> None:
    model = resnet(width=0.125, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))  # nothing else shifts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_builder_argument_is_a_config_key(name) -> None:
    keys = set(compose_config([f"model={name}"]).model) - {"name"}
    arguments = set(inspect.signature(MODELS.get(name)).parameters) - {"input_shape", "num_classes"}
    assert arguments <= keys


def test_vgg_blocks_config_key_builds() -> None:
    cfg = compose_config(["model.blocks=[[32,M],[64,M],[64,M]]", "model.width=0.25"])
    model = build_model("vgg", (1, 28, 28), 10, **options(cfg.model))
    assert model.block_output_shapes() == [(8, 14, 14), (16, 7, 7), (16, 3, 3)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_vgg_too_small_input_says_the_smallest_and_the_fix() -> None:
    with pytest.raises(ModelInputError, match=r"at least 16×16, got 8×8.*model\.blocks.*resnet18") as caught:
        build_model("vgg", (1, 8, 8), 10, width=0.125, predictor_hidden=16)
    assert "\n" not in str(caught.value)
    assert build_model("vgg", (1, 16, 16), 10, width=0.125, predictor_hidden=16).block_output_shapes()[-1] == (64, 1, 1)


def test_vgg_smallest_input_follows_the_pools() -> None:
    """Two max-pools need 4×4; the minimum is computed from the spec, not fixed at the paper's 16."""
    two_pools = [[8, "M"], [8, "M"]]
    assert build_model("vgg", (1, 4, 4), 10, blocks=two_pools, predictor_hidden=16)(torch.zeros(2, 1, 4, 4)).shape == (2, 10)
    with pytest.raises(ModelInputError, match="at least 4×4, got 3×3"):
        build_model("vgg", (1, 3, 3), 10, blocks=two_pools, predictor_hidden=16)


def test_flat_input_is_refused_in_one_line() -> None:
    with pytest.raises(ModelInputError, match=r"\(channels, height, width\), got input shape \(64,\)"):
        build_model("resnet18", (64,), 10)
