"""Data: raw sources → prepared files (prepare) → memory-mapped splits and loaders (datasets).

Images are decoded once into uint8 tensors; text documents are preprocessed once into token ids (text.py).
"""

from scpl_kit.data import bbcnews, synthetic, textcorpora, tinyimagenet  # noqa: F401  (register themselves next to the sources in sources.py)
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.facts import FACTS, DatasetFacts, dataset_facts
from scpl_kit.data.sources import SOURCES, register_dataset, source_options
from scpl_kit.data.text import RawText, register_text_dataset

__all__ = [
    "FACTS", "SOURCES", "CorruptDataError", "DatasetFacts", "DatasetNotFoundError", "RawText", "dataset_facts",
    "register_dataset", "register_text_dataset", "source_options",
]
