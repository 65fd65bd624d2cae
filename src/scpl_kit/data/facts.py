"""What is known about a dataset without any of its data: the input shape and the number of classes.

Configs, model building and tests can then be checked before (or without) downloading and preparing.
Each dataset registers its facts next to its source (`register_dataset` in sources.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from scpl_kit.registry import Registry


@dataclass(frozen=True)
class DatasetFacts:
    input_shape: tuple[int, ...]  # C, H, W of the prepared images; (max_len,) of token ids for text
    num_classes: int
    modality: str = "image"


FACTS: Registry = Registry("dataset")


def keyword_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `options` that `fn` takes as keyword-only parameters.

    A dataset's options (e.g. image_size) are the keyword-only parameters of its loader and facts, so a
    whole data config can be passed: its other keys (processed_dir, hflip, ...) are not the source's business.
    """
    wanted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return {name: options[name] for name in wanted if name in options}


def dataset_facts(name: str, /, **data_options: Any) -> DatasetFacts:
    """The facts of dataset `name` under the data-config options that shape it, e.g.
    `dataset_facts(cfg.data.name, **cfg.data)` or `dataset_facts("tinyimagenet", image_size=64)`."""
    facts = FACTS.get(name)
    return facts(**keyword_options(facts, data_options))
