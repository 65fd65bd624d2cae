from pathlib import Path

import pytest
import yaml

from scpl_kit.config import ConfigError, compose_config, config_dir
from scpl_kit.data import dataset_facts
from scpl_kit.engines import build_engine
from scpl_kit.methods import METHODS, build_units
from scpl_kit.models import MODELS, ModelInputError, build_model
from scpl_kit.train import main as train_main, options

GROUPS = ["data", "model", "method", "engine", "trainer", "profile"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_required_groups_exist() -> None:
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ is empty"


def first_model_that_fits(cfg, facts) -> str:
    """A dataset's inputs may be too small for the default model (VGG's pools need ≥ 16×16): any model
    that takes them will do; a dataset no model takes is an error."""
    for name in [cfg.model.name, *MODELS.names()]:
        try:
            build_model(name, facts.input_shape, facts.num_classes, **options(compose_config([f"model={name}"]).model))
            return name
        except ModelInputError:
            continue
    raise AssertionError(f"no model takes {cfg.data.name}'s inputs {facts.input_shape}")


def is_text_option(override: str) -> bool:
    """A text dataset (its config has `max_len`) or a text model (`vocab_size`): composed under a text profile."""
    group, option = override.split("=")
    keys = yaml.safe_load((config_dir() / group / f"{option}.yaml").read_text()) or {}
    return group in ("data", "model") and bool({"max_len", "vocab_size"} & set(keys))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_builds(override: str) -> None:
    cfg = compose_config([*(["profile=offline_text"] if is_text_option(override) else []), override])
    facts = dataset_facts(cfg.data.name, **cfg.data)  # what the dataset is, without its files
    if override.startswith("data=") and not is_text_option(override):
        cfg = compose_config([override, f"model={first_model_that_fits(cfg, facts)}"])
    model = build_model(cfg.model.name, facts.input_shape, facts.num_classes, **options(cfg.model))
    units = build_units(cfg.method.name, model, facts.num_classes, **options(cfg.method))
    assert units
    try:
        assert build_engine(cfg.engine.name, **options(cfg.engine)) is not None
    except RuntimeError as error:  # a multi-process engine outside torchrun says how to launch it
        assert "torchrun" in str(error)


@pytest.mark.parametrize("profile", group_options("profile"))
@pytest.mark.parametrize("method", group_options("method"))
def test_every_profile_composes_with_every_method(profile: str, method: str) -> None:
    cfg = compose_config([f"profile={profile}", f"method={method}"])
    assert cfg.method.name in METHODS.names() and cfg.trainer.epochs > 0  # tuned configs reuse a method's name


def test_command_line_wins_over_profile() -> None:
    cfg = compose_config(["profile=offline", "data=cifar10", "trainer.epochs=3"])
    assert cfg.data.name == "cifar10" and cfg.trainer.epochs == 3


def test_paper_profile_is_the_paper_setting() -> None:
    cfg = compose_config(["profile=paper"])
    assert (cfg.data.name, cfg.model.width, cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.augmentation) == ("cifar10", 1.0, 1024, 200, "strong")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.lr_min, cfg.optimizer.schedule, cfg.method.temperature) == ("adam", 1e-3, 1e-5, "cosine", 0.1)


def test_paper_text_profile_is_the_paper_setting() -> None:
    """methods.md §4: width 300, 6 heads, d_ff 300, dropout 0.1, no positional encoding, batch 1024,
    50 epochs, Adam 1e-3 constant; SCPL's projector is the identity; AG News at 60 tokens."""
    cfg = compose_config(["profile=paper_text", "method=scpl"])
    assert (cfg.data.name, cfg.data.max_len, cfg.data.vocab_size, cfg.model.name) == ("agnews", 60, 30000, "transformer")
    assert (cfg.model.dim, cfg.model.heads, cfg.model.ff_dim, cfg.model.dropout, cfg.model.positional) == (300, 6, 300, 0.1, "none")
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.optimizer.lr, cfg.optimizer.schedule, cfg.method.projector) == (1024, 50, 1e-3, "constant", "i")
    assert compose_config(["profile=paper_text", "model=lstm"]).model.dim == 300


@pytest.mark.parametrize(("override", "named"), [
    ("trainer.epoch=2", "valid keys under 'trainer': augmentation, batch_size"),
    ("method.temp=0.5", "projector, projector_dim, projector_hidden, temperature, variant"),
    ("sed=1", "valid keys at the top level: data, engine"),
    ("method=magic", "available options in 'method'"),
    ("data=imagenet", "available options in 'data': " + ", ".join(group_options("data"))),
])
def test_wrong_key_or_option_names_the_valid_ones(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        compose_config([override])
    assert named in str(error.value) and "\n" not in str(error.value)  # one line, as the CLI prints it


def test_cli_reports_config_errors_without_traceback(capsys: pytest.CaptureFixture) -> None:
    assert train_main(["trainer.epoch=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'trainer.epoch'") and "Traceback" not in err


def test_cli_reports_missing_data(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert train_main([f"data.processed_dir={tmp_path}", "tracking.enabled=false"]) == 2
    assert "python -m scpl_kit.prepare data=mnist5k" in capsys.readouterr().err


def builder_arguments(registry, name: str, given: tuple[str, ...]) -> set[str]:
    import inspect

    return set(inspect.signature(registry.get(name)).parameters) - set(given)


@pytest.mark.parametrize(("group", "registry", "given"), [
    ("model", "MODELS", ("input_shape", "num_classes")),
    ("method", "METHODS", ("model", "num_classes")),
    ("engine", "ENGINES", ()),
])
def test_every_builder_argument_is_a_config_key(group: str, registry: str, given: tuple[str, ...]) -> None:
    """What a builder takes can be set from the command line: conf/<group>/<name>.yaml lists every
    argument (a tuned or paired config, e.g. bp_gpipe, reuses its method's builder and is skipped),
    and every method config the keys `build_units` handles for all methods (modules, cuts)."""
    import inspect

    import scpl_kit.engines
    import scpl_kit.methods
    import scpl_kit.models

    every_method = set(inspect.signature(scpl_kit.methods.build_units).parameters) - {"name", "model", "num_classes", "options"}
    assert every_method == {"modules", "cuts"}
    shared = every_method if group == "method" else set()

    table = {"MODELS": scpl_kit.models.MODELS, "METHODS": scpl_kit.methods.METHODS, "ENGINES": scpl_kit.engines.ENGINES}[registry]
    for name in table.names():
        override = f"{group}={name}"
        keys = set(compose_config([*(["profile=offline_text"] if is_text_option(override) else []), override])[group]) - {"name"}
        assert keys == builder_arguments(table, name, given) | shared, f"conf/{group}/{name}.yaml"
