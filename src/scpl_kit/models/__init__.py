"""Networks as K blocks plus a predictor. Importing this package registers every model."""

from scpl_kit.models.base import MODELS, BlockModel, build_model
from scpl_kit.models import vgg  # noqa: F401  (registers "vgg")

__all__ = ["MODELS", "BlockModel", "build_model"]
