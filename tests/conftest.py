from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig

from scpl_kit.config import compose_config
from scpl_kit.data.prepare import prepare_dataset
from scpl_kit.data.sources import source_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-5k prepared once per test session (real data, ~4 s)."""
    out = tmp_path_factory.mktemp("processed")
    prepare_dataset("mnist5k", out, out / "raw", val_fraction=0.1, test_fraction=0.2, split_seed=0, download=False)
    return out


@pytest.fixture(scope="session")
def text_processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BBC News prepared once per test session as the `smoke_text` profile asks (real data, short documents)."""
    out = tmp_path_factory.mktemp("processed_text")
    data = compose_config(["profile=smoke_text"], config_name="prepare").data
    prepare_dataset("bbcnews", out, out / "raw", val_fraction=0.1, test_fraction=0.2, split_seed=0, download=False, **source_options("bbcnews", data))
    return out


def composer(profile: str, processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_config([
            f"profile={profile}",
            f"data.processed_dir={processed_dir}",
            f"out_dir={tmp_path / 'out'}",
            f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}",
            "trainer.progress=false",
            "tracking.enabled=false",
            *overrides,
        ])

    return make


@pytest.fixture
def smoke_config(processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the `smoke` profile with every file it writes under tmp_path and tracking off."""
    return composer("smoke", processed_dir, tmp_path)


@pytest.fixture
def text_smoke_config(text_processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """The same for text: the `smoke_text` profile (a tiny Transformer or LSTM on BBC News)."""
    return composer("smoke_text", text_processed_dir, tmp_path)
