"""Data: raw sources → prepared uint8 tensors (prepare) → memory-mapped splits and loaders (datasets)."""

from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.sources import SOURCES

__all__ = ["SOURCES", "CorruptDataError", "DatasetNotFoundError"]
