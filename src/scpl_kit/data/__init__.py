"""Data: raw sources → prepared uint8 tensors (prepare) → memory-mapped splits and loaders (datasets)."""

from scpl_kit.data import tinyimagenet  # noqa: F401  (registers itself next to the sources in sources.py)
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.facts import FACTS, DatasetFacts, dataset_facts
from scpl_kit.data.sources import SOURCES, register_dataset, source_options

__all__ = [
    "FACTS", "SOURCES", "CorruptDataError", "DatasetFacts", "DatasetNotFoundError", "dataset_facts", "register_dataset",
    "source_options",
]
