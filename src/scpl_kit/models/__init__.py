"""Networks as K blocks plus a predictor. Importing this package registers every model."""

from scpl_kit.models.base import MODELS, BlockModel, ModelInputError, build_model
from scpl_kit.models import resnet, text, vgg  # noqa: F401  (registers "resnet18", "lstm", "transformer", "vgg")

__all__ = ["MODELS", "BlockModel", "ModelInputError", "build_model"]
