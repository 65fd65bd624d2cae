"""Prepare a dataset: python -m scpl_kit.prepare [data=<name>] [profile=<name>] [key=value ...]"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

from scpl_kit.config import ConfigError, compose_config
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import prepare_dataset
from scpl_kit.data.sources import source_options
from scpl_kit.preflight import OneLineParser, PreflightError, check_output_dir, check_values, fail
from scpl_kit.registry import UnknownNameError


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what preparing would create), or None."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.prepare", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=cifar10")
    args = parser.parse_args(argv)
    created = None
    try:
        cfg = compose_config(args.overrides, config_name="prepare")
        data = cfg.data
        # Before anything is read or written: fractions and sizes in range, an output folder that can be.
        check_values(cfg, under="data.")
        check_output_dir(data.processed_dir, "data.processed_dir")
        created = first_missing(Path(data.processed_dir).absolute() / str(data.name))
        options = source_options(data.name, data)  # e.g. tinyimagenet's image_size, recorded in meta.json
        try:
            out = prepare_dataset(
                data.name, data.processed_dir, data.raw_dir, data.val_fraction, data.test_fraction, data.split_seed, data.download, **options
            )
        except ValueError as error:
            if "test_size" not in str(error):  # scikit-learn's stratified split: the only train_test_split caller
                raise
            raise PreflightError(
                f"data.val_fraction={data.val_fraction}, data.test_fraction={data.test_fraction}: a split of {data.name} "
                f"would be too small to hold every class ({error})"
            ) from None
    except (ConfigError, PreflightError, UnknownNameError, DatasetNotFoundError, CorruptDataError) as error:
        if created is not None and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created)  # the empty folders this run made: a failed prepare leaves nothing behind
        return fail(error)
    print(f"prepared {data.name} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
