import inspect
from pathlib import Path

import pytest

from scpl_kit.config import compose_config, config_dir
from scpl_kit.data import FACTS, SOURCES, DatasetFacts, dataset_facts
from scpl_kit.data.datasets import load_prepared
from scpl_kit.registry import UnknownNameError


def test_mnist5k_facts_match_its_prepared_data(processed_dir: Path) -> None:
    data = load_prepared("mnist5k", processed_dir)
    assert dataset_facts("mnist5k") == DatasetFacts(data.input_shape, data.num_classes)


@pytest.mark.parametrize("name", sorted(p.stem for p in (config_dir() / "data").glob("*.yaml")))
def test_every_data_config_has_facts(name: str) -> None:
    data = compose_config([f"data={name}"]).data
    facts = dataset_facts(data.name, **data)  # a whole data config: keys the facts do not read are ignored
    shape = {"image": 3, "text": 1}[facts.modality]  # (channels, height, width) or (max_len,)
    assert len(facts.input_shape) == shape and facts.num_classes > 1


def test_facts_follow_the_options() -> None:
    assert dataset_facts("tinyimagenet").input_shape == (3, 32, 32)
    assert dataset_facts("tinyimagenet", image_size=64) == DatasetFacts((3, 64, 64), 200)
    with pytest.raises(ValueError, match="32 .* or 64"):
        dataset_facts("tinyimagenet", image_size=128)


def test_every_source_has_facts_with_the_same_options() -> None:
    assert SOURCES.names() == FACTS.names()

    def options(fn: object) -> set[str]:
        return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    for name in SOURCES.names():
        assert options(FACTS.get(name)) == options(SOURCES.get(name)), name


def test_unknown_dataset_lists_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match=f"valid datasets: {', '.join(FACTS.names())}$"):
        dataset_facts("imagenet")
