"""Evaluate finished runs' saved weights on their test split, independently of the training loop.

    python -m scpl_kit.evaluate runs/mnist5k-vgg-scpl-s0 reports/eval/mnist5k-vgg-scpl-s0.json
    python -m scpl_kit.evaluate --params params.yaml --runs runs --out reports/eval   # every run of the grid

Rebuilds the model and units from the run's own config.yaml, loads model.pt (the weights of the
best-validation epoch), and reports test accuracy, per-class accuracy and the confusion matrix; it
also checks that the accuracy equals the `test_acc` training reported, and adds it to the run's
MLflow entry.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from scpl_kit.devices import load_on_cpu
from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.methods.units import SCORES
from scpl_kit.preflight import OneLineParser, PreflightError, check_input_dir, check_output_dir, fail, load_params
from scpl_kit.report.grid import run_names
from scpl_kit.data.datasets import PreparedData
from scpl_kit.train import USER_ERRORS, build, load_data
from scpl_kit.tracking import MlflowTracker

RUN_FILES = ("config.yaml", "metrics.json", "model.pt")  # what training leaves in a run folder, and evaluation reads


@functools.lru_cache(maxsize=4)
def data_for(data_config: str) -> PreparedData:
    """Prepared data, opened and checksum-verified once per data config (a grid's runs share one)."""
    return load_data(OmegaConf.create({"data": json.loads(data_config)}))


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    trained = json.loads((run_dir / "metrics.json").read_text())
    data = data_for(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True))
    _, units = build(cfg, data)
    for unit, state in zip(units, load_on_cpu(run_dir / "model.pt")["units"], strict=True):
        unit.load_state_dict(state)
    engine = SequentialEngine("auto")  # this host's device, whatever the run trained on (a GPU run evaluates on a CPU-only host)
    engine.setup(units)
    predicted = engine.predict(data.loader("test", cfg.trainer.eval_batch_size))[SCORES].argmax(dim=1).numpy()
    labels = np.asarray(data.splits["test"][1])
    confusion = np.zeros((data.num_classes, data.num_classes), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    test_acc = float((predicted == labels).mean())
    return {
        "run": str(run_dir),
        **{key: trained[key] for key in ("dataset", "model", "method", "engine", "seed", "mlflow_run_id")},
        "saved_weights": trained["saved_weights"],
        "test_acc": test_acc,
        "matches_training": abs(test_acc - trained["test_acc"]) < 1e-6,
        "per_class_acc": dict(zip(data.meta["classes"], (confusion.diagonal() / confusion.sum(axis=1)).round(4).tolist())),
        "confusion": confusion.tolist(),
    }


def evaluate_to(run_dir: Path, output: Path) -> bool:
    """Evaluate one run, write its report, add it to the run's MLflow entry; True when it matches training."""
    report = evaluate_run(run_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if report["mlflow_run_id"] and cfg.tracking.enabled:
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
        tracker.use_run(report["mlflow_run_id"])
        tracker.log_metrics({"eval/test_acc": report["test_acc"]})
        tracker.log_json(report, "eval.json")
    print(f"{run_dir}: test accuracy {report['test_acc']:.4f} (matches training: {report['matches_training']})")
    return report["matches_training"]


def check_runs(run_dirs: Sequence[Path], key: str) -> None:
    """Every run folder holds what training leaves (checked for all of them before any is evaluated)."""
    def lacks(folder: Path) -> str | None:
        if not folder.is_dir():
            return f"run folder {folder} does not exist"
        missing = [name for name in RUN_FILES if not (folder / name).is_file()]
        return f"run folder {folder} has no {', '.join(missing)}" if missing else None

    problems = [problem for problem in map(lacks, run_dirs) if problem]
    if problems:
        others = f" (and {len(problems) - 1} more of the {len(run_dirs)} runs)" if len(problems) > 1 else ""
        raise PreflightError(f"{key}: {problems[0]}{others}; train it first (`dvc repro`)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m scpl_kit.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="one run folder (or use --params)")
    parser.add_argument("output", type=Path, nargs="?", help="its report (.json)")
    parser.add_argument("--params", type=Path, help="params.yaml: evaluate every run of its grid")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("reports/eval"))
    args = parser.parse_args(argv)
    if args.params is None and (args.run_dir is None or args.output is None):
        parser.error("give a run folder and an output file, or --params")
    try:
        if args.params is None:
            check_runs([args.run_dir], "run_dir")
            try:
                check_output_dir(args.output.parent, "output")
            except PreflightError as error:
                raise PreflightError(f"output={args.output} cannot be written: {str(error).split(': ', 1)[-1]}") from None
            return 0 if evaluate_to(args.run_dir, args.output) else 1
        names = run_names(load_params(args.params, "grid"))
        check_input_dir(args.runs, "--runs")
        check_runs([args.runs / name for name in names], "--runs")
        check_output_dir(args.out, "--out")
        results = [evaluate_to(args.runs / name, args.out / f"{name}.json") for name in tqdm(names, desc="evaluate", unit="run")]
    except USER_ERRORS as error:  # PreflightError among them; also a run's data that is gone or was changed
        return fail(error)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
