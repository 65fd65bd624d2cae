from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig

from scpl_kit.config import compose_config
from scpl_kit.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-5k prepared once per test session (real data, ~4 s)."""
    out = tmp_path_factory.mktemp("processed")
    prepare_dataset("mnist5k", out, out / "raw", val_fraction=0.1, test_fraction=0.2, split_seed=0, download=False)
    return out


@pytest.fixture
def smoke_config(processed_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the `smoke` profile with every file it writes under tmp_path and tracking off."""

    def make(*overrides: str) -> DictConfig:
        return compose_config([
            "profile=smoke",
            f"data.processed_dir={processed_dir}",
            f"out_dir={tmp_path / 'out'}",
            f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}",
            "trainer.progress=false",
            "tracking.enabled=false",
            *overrides,
        ])

    return make
