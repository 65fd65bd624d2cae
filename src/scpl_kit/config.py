"""Compose Hydra configs from conf/ (the compose API, so train, prepare, sweeps and tests share one path)
and turn Hydra's errors into messages that name the valid keys or options."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # src/scpl_kit/config.py → the checkout


class ConfigError(ValueError):
    """A config that cannot be composed; the message names what would be valid."""


def config_dir() -> Path:
    """conf/ of the checkout (the package is installed editable), or $SCPL_CONF_DIR."""
    path = Path(os.environ.get("SCPL_CONF_DIR", PACKAGE_ROOT / "conf")).resolve()
    if not (path / "train.yaml").is_file():
        raise ConfigError(f"no conf/train.yaml under {path}; install the package editable from its checkout (pip install -e .) or set SCPL_CONF_DIR")
    return path


def project_root(start: Path | None = None) -> Path:
    """The repository a run belongs to: the nearest folder up from `start` with a dvc.yaml.

    DVC runs queued/temporary experiments in copies under `<repo>/.dvc/tmp/exps/`; those map back
    to `<repo>`, so every run of a project lands in the same MLflow database.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:
        here = Path(*parts[: parts.index(".dvc")])
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The composed config, plus `choices`: which option of each group it was built from (the profile
    and a tuned method's file name appear nowhere else, yet they say what a run measured)."""
    overrides = list(overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="scpl_kit"):
        try:
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            from scpl_kit.preflight import one_line  # preflight reads configs: imported late, not circularly

            raise ConfigError(one_line(_explain(error, overrides, config_name))) from None
    conf = config_dir()
    with open_dict(cfg):
        choices = {
            group: option for group, option in cfg.hydra.runtime.choices.items()
            if not group.startswith("hydra/") and (conf / group / f"{option}.yaml").is_file()  # an optional group with no file chose nothing
        }
        del cfg["hydra"]
        cfg.choices = choices
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the config: {error}") from None
    return cfg


def _explain(error: Exception, overrides: list[str], config_name: str) -> str:
    """Add the valid keys to Hydra's 'Could not override' message (its own lists none)."""
    message = str(error)
    message = message.split("\nConfig search path")[0].strip()
    match = re.search(r"Could not override '([^']+)'", message)
    if not match:
        return message
    key = match.group(1)
    others = [o for o in overrides if not re.match(rf"^[+~]*{re.escape(key)}=", o)]
    try:
        base = compose(config_name, overrides=others)
    except Exception:  # another override is broken too: Hydra's own message is the best we have
        return message
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return message
    where = f"under '{parent}'" if parent else "at the top level"
    return f"unknown config key '{key}'; valid keys {where}: {', '.join(sorted(str(k) for k in node.keys()))}"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}: the shape MLflow params and tables want."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
