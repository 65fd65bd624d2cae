"""Evaluate a finished run's saved weights on its test split, independently of the training loop.

    python -m scpl_kit.evaluate runs/scpl-s0 reports/eval/scpl-s0.json

Rebuilds the model and units from the run's own config.yaml, loads model.pt (the weights of the
best-validation epoch), and reports test accuracy, per-class accuracy and the confusion matrix; it
also checks that the accuracy equals the `test_acc` training reported, and adds it to the run's
MLflow entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from scpl_kit.engines.sequential import SequentialEngine
from scpl_kit.train import build, load_data
from scpl_kit.tracking import MlflowTracker


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    trained = json.loads((run_dir / "metrics.json").read_text())
    data = load_data(cfg)
    _, units = build(cfg, data)
    for unit, state in zip(units, torch.load(run_dir / "model.pt")["units"], strict=True):
        unit.load_state_dict(state)
    engine = SequentialEngine(cfg.engine.get("device", "cpu"))
    engine.setup(units)
    predicted = engine.predict(data.loader("test", cfg.trainer.eval_batch_size)).argmax(dim=1).numpy()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scpl_kit.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    report = evaluate_run(args.run_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    if report["mlflow_run_id"] and cfg.tracking.enabled:
        tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment)
        tracker.use_run(report["mlflow_run_id"])
        tracker.log_metrics({"eval/test_acc": report["test_acc"]})
        tracker.log_json(report, "eval.json")
    print(f"{args.run_dir}: test accuracy {report['test_acc']:.4f} (matches training: {report['matches_training']})")
    return 0 if report["matches_training"] else 1


if __name__ == "__main__":
    sys.exit(main())
