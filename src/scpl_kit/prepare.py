"""Prepare a dataset: python -m scpl_kit.prepare [data=<name>] [profile=<name>] [key=value ...]"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from scpl_kit.config import ConfigError, compose_config
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import prepare_dataset
from scpl_kit.data.sources import source_options
from scpl_kit.registry import UnknownNameError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scpl_kit.prepare", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=cifar10")
    args = parser.parse_args(argv)
    try:
        data = compose_config(args.overrides, config_name="prepare").data
        options = source_options(data.name, data)  # e.g. tinyimagenet's image_size, recorded in meta.json
        out = prepare_dataset(
            data.name, data.processed_dir, data.raw_dir, data.val_fraction, data.test_fraction, data.split_seed, data.download, **options
        )
    except (ConfigError, UnknownNameError, DatasetNotFoundError, CorruptDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"prepared {data.name} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
