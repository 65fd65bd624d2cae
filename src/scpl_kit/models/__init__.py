"""Networks as K blocks plus a predictor. Importing this package registers every model."""

from scpl_kit.models.base import MODELS, BlockModel, ModelInputError, build_model
from scpl_kit.models import resnet, vgg  # noqa: F401  (registers "resnet18", "vgg")

__all__ = ["MODELS", "BlockModel", "ModelInputError", "build_model"]
