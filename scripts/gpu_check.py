"""The project's GPU check: what a GPU user's first day runs, in a few minutes, written to one report.

    make gpu-check                                   # one GPU or more, about 9 minutes; report in gpu-check/
    python scripts/gpu_check.py --device cpu --quick --out /tmp/check   # the same steps at toy sizes (tests run this)

Steps (each bounded by what is left of --budget-s; a failed step is reported, the next one runs):
  environment   torch, CUDA, the GPUs
  loader        views/s of CIFAR-shaped batches on the device, plain and with the paper's strong augmentation
                (two views an image, batched on the device) per loader worker count
  sweep         in one process, on the device, for a few steps on synthetic data at the paper's width and batch:
                every method on VGG8; BP and SCPL on VGG8, ResNet-18, LSTM and Transformer, fp32 and bf16;
                samples/s, peak memory (CUDA's own count) and GPU utilisation (pynvml) per row
  engines       threads (two units on one GPU or two), and the multi-process engines as 2 ranks: sharing one GPU
                over gloo (NCCL refuses two ranks on one device); over NCCL on two GPUs when there are two
  checkpoint    a run's model.pt written on the device, evaluated by a process that sees no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("bp", "scpl", "early_exit", "al", "dgl", "infopro", "contsup", "cascade", "auglocal", "predsim", "deinforeg")
MULTI_RANK = ("pipeline", "ddp", "hierarchical", "async_sgd")
IMAGES = 8192  # random CIFAR-shaped images: 6,963 for training, 6 batches of the paper's 1,024


class Check:
    def __init__(self, out: Path, device: str, quick: bool, budget_s: float, limit: int | None = None) -> None:
        self.out, self.device, self.quick, self.limit = out, device, quick, limit
        self.deadline = time.monotonic() + budget_s
        self.work = out / "work"
        self.report: dict[str, Any] = {"device": device, "quick": quick}
        self.gpus = torch.cuda.device_count() if device != "cpu" else 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, work: Callable[[], Any]) -> None:
        """Run one step, keep what it returns (or its error) in the report; skip it when time is up."""
        if self.left() < 20:
            self.report[name] = {"skipped": "out of time"}
            return
        started = time.monotonic()
        try:
            self.report[name] = work()
        except Exception as error:  # the check goes on: a report of every failure is its purpose
            self.report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)

    # -- sizes -----------------------------------------------------------------------------------

    def common(self) -> list[str]:
        return [f"data.processed_dir={self.work / 'processed'}", "tracking.enabled=false", "trainer.progress=false", "trainer.resume=false",
                f"trainer.checkpoint_dir={self.work / 'checkpoints'}", "trainer.eval_test=false", "trainer.epochs=1", "trainer.measure=true",
                f"trainer.steps_per_epoch={2 if self.quick else 6}", "trainer.measure_memory_steps=0"]  # CUDA's peak needs no profiled steps

    def on_device(self) -> list[str]:
        """The sequential engine on the checked device."""
        return ["engine=sequential", f"engine.device={self.device}"]

    def vision(self) -> list[str]:
        """The paper's VGG8 setting (width 1, batch 1024) on random CIFAR-10-shaped images."""
        return ["data=synthetic_cifar10", *(["model.width=0.125", "trainer.batch_size=64", "trainer.eval_batch_size=256"] if self.quick else
                                           ["model.width=1.0", f"data.samples={IMAGES}", "trainer.batch_size=1024", "trainer.eval_batch_size=1024"])]

    def text(self, model: str) -> list[str]:
        """The paper's text models at width 300 on random AG-News-shaped documents; batch 256, not the paper's
        1024: the synthetic set's 1,530 training documents make 5 such batches."""
        return ["profile=paper_text", "data=synthetic_agnews", f"model={model}", f"trainer.batch_size={64 if self.quick else 256}", "trainer.eval_batch_size=256"]

    # -- steps -----------------------------------------------------------------------------------

    def environment(self) -> dict[str, Any]:
        from scpl_kit.environment import describe

        found = {**describe(), "cuda": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(self.gpus)]}
        try:
            found["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found["nvidia_smi"] = "absent"
        return found

    def prepare(self) -> dict[str, str]:
        from scpl_kit.config import compose_config
        from scpl_kit.data.prepare import prepare_dataset
        from scpl_kit.data.sources import source_options

        processed = self.work / "processed"
        for name in ("synthetic_cifar10", "synthetic_agnews"):
            data = compose_config([f"data={name}", *([f"data.samples={IMAGES}"] if not self.quick and name == "synthetic_cifar10" else [])],
                                  config_name="prepare").data
            prepare_dataset(name, processed, processed / "raw", val_fraction=data.val_fraction, test_fraction=data.test_fraction, split_seed=0,
                            download=False, **source_options(name, data))
        return {"processed": str(processed)}

    def loader(self) -> list[dict[str, Any]]:
        from scpl_kit.data.augment import Augmentation
        from scpl_kit.data.datasets import load_prepared
        from scpl_kit.devices import resolve_device

        data = load_prepared("synthetic_cifar10", self.work / "processed")
        device, batch, batches = resolve_device(self.device), 128 if self.quick else 1024, 3 if self.quick else 12
        rows = []
        for kind, workers in [("none", 0), *(("strong", w) for w in ((0, 2) if self.quick else (0, 2, 4, 8, 12)))]:
            order = torch.Generator().manual_seed(0)
            loader = data.loader("train", batch, shuffle=True, augmentation=Augmentation(kind, 32, True), generator=order,
                                 num_workers=workers, drop_last=True, device=device)
            started, images = time.perf_counter(), 0
            for i, (x, _) in enumerate(loader):  # the first batch waits for the workers to start: not timed
                if i == 0:
                    started = time.perf_counter()
                else:
                    images += len(x)
                if i == batches:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows.append({"augmentation": kind, "workers": workers, "views_per_s": images / (time.perf_counter() - started), "batch": batch})
        return rows

    def sweep(self) -> list[dict[str, Any]]:
        rows = [(f"vgg8 {m}", [*self.vision(), f"method={m}"]) for m in METHODS]  # each run: + on_device()
        for precision in ("fp32", "bf16"):
            for method in ("bp", "scpl"):
                rows += [(f"vgg8 {method} {precision} strong aug (paper)", ["profile=paper", *self.vision(), f"method={method}", f"optimizer.precision={precision}"]),
                         (f"resnet18 {method} {precision}", [*self.vision(), "model=resnet18", f"method={method}", f"optimizer.precision={precision}"]),
                         *((f"{m} {method} {precision}", [*self.text(m), f"method={method}", f"optimizer.precision={precision}"]) for m in ("lstm", "transformer"))]
        return [self.train_row(name, [*overrides, *self.on_device()]) for name, overrides in rows[: self.limit] if self.left() > 30]

    def train_row(self, name: str, overrides: list[str]) -> dict[str, Any]:
        from scpl_kit.config import compose_config
        from scpl_kit.train import run

        with Utilisation(self.device) as utilisation:
            try:
                out = self.work / "runs" / folder(name)
                summary = run(compose_config([*overrides, *self.common(), f"out_dir={out}"]))
            except Exception as error:
                return {"row": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        return {"row": name, "samples_per_s": summary.get("time/samples_per_s"), "peak_mb": summary.get("memory/peak_mb"),
                "gpu_util_pct": utilisation.mean()}

    def engines(self) -> list[dict[str, Any]]:
        pair = "cpu,cpu" if self.device == "cpu" else ("cuda:0,cuda:1" if self.gpus >= 2 else "cuda:0,cuda:0")
        rows = [self.train_row("threads scpl", [*self.vision(), "method=scpl", "engine=threads", f"engine.devices=[{pair}]"])]
        shared = "cpu" if self.device == "cpu" else "cuda:0"
        for engine in (*MULTI_RANK, "gpipe"):
            if len(rows) >= self.limit:
                break
            method = "bp" if engine in ("gpipe", "ddp", "hierarchical", "async_sgd") else "scpl"
            if engine == "gpipe" and self.device != "cpu":
                continue  # two ranks on one GPU need gloo, which cannot carry pipelining's CUDA sends: with two GPUs below
            rows.append(self.ranks_row(f"{engine} {method} 2 ranks on {shared} (gloo)", engine, method, [f"engine.device={shared}", "engine.backend=gloo"]))
        if self.gpus >= 2:
            for engine in ("pipeline", "gpipe", "ddp", "hierarchical", "async_sgd"):
                method = "scpl" if engine == "pipeline" else "bp"
                rows.append(self.ranks_row(f"{engine} {method} on 2 GPUs (nccl)", engine, method, ["engine.device=auto", "engine.backend=auto"]))
        return rows[: self.limit]

    def ranks_row(self, name: str, engine: str, method: str, placement: list[str]) -> dict[str, Any]:
        if self.left() < 40:
            return {"row": name, "skipped": "out of time"}
        out = self.work / "runs" / folder(name)
        overrides = [*self.vision(), f"method={method}", f"engine={engine}", "engine.processes=2", *self.common(), *placement,
                     f"out_dir={out}", "engine.timeout_s=120"]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "scpl_kit.train", *overrides], capture_output=True, text=True,
                              timeout=max(self.left() - 10, 30), cwd=REPO)
        row: dict[str, Any] = {"row": name, "rc": done.returncode, "seconds": round(time.monotonic() - started, 1)}
        if done.returncode == 0:
            metrics = json.loads((out / "metrics.json").read_text())
            row.update(samples_per_s=metrics.get("time/samples_per_s"), peak_mb=metrics.get("memory/peak_mb"))
        else:
            row["error"] = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        return row

    def checkpoint(self) -> dict[str, Any]:
        """model.pt from a run on the device, evaluated where no GPU is visible."""
        from scpl_kit.config import compose_config
        from scpl_kit.train import run

        out = self.work / "runs" / "checkpoint"
        run(compose_config([*self.vision(), "method=scpl", *self.on_device(), *self.common(), "trainer.eval_test=true", f"out_dir={out}"]))
        devices = {str(t.device) for unit in torch.load(out / "model.pt", map_location=None, weights_only=False)["units"] for t in unit.values()}
        done = subprocess.run([sys.executable, "-m", "scpl_kit.evaluate", str(out), str(out / "eval.json")], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        report = json.loads((out / "eval.json").read_text()) if done.returncode == 0 else {}
        return {"saved_on": sorted(devices), "evaluate_rc": done.returncode, "matches_training": report.get("matches_training"),
                "error": done.stderr.strip().splitlines()[-1:] if done.returncode else None}


def folder(row: str) -> str:
    """A row's name as a folder Hydra's override grammar takes (no spaces, brackets or colons)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_")


class Utilisation:
    """The GPU's mean utilisation (%) while the block runs, sampled through pynvml (None without a GPU)."""

    def __init__(self, device: str) -> None:
        self.device, self.samples, self.stop = device, [], threading.Event()

    def __enter__(self) -> "Utilisation":
        if self.device != "cpu" and torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(0 if self.device in ("auto", "cuda") else int(self.device.split(":")[1]))
                threading.Thread(target=self.sample, args=(pynvml, handle), daemon=True).start()
            except Exception:  # no NVML: utilisation stays unknown
                pass
        return self

    def sample(self, pynvml: Any, handle: Any) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def markdown(report: dict[str, Any]) -> str:
    import pandas as pd

    lines = [f"# GPU check ({report['device']}{', quick' if report['quick'] else ''})\n"]
    env = report.get("environment", {})
    lines.append(f"torch {env.get('torch')}, CUDA {env.get('cuda')}, GPUs: {', '.join(env.get('gpus', [])) or 'none'}\n")
    for section in ("loader", "sweep", "engines"):
        rows = report.get(section)
        table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f") if isinstance(rows, list) and rows else str(rows)
        lines.append(f"\n## {section}\n\n{table}")
    lines.append(f"\n## checkpoint\n\n{report.get('checkpoint')}\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda", help="cuda (the first GPU), cuda:N, or cpu to try the steps without one")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the steps themselves, not the GPU's speed")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--steps", default="environment,prepare,loader,sweep,engines,checkpoint")
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows of the sweep and of the engines (a quick try)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("error: no GPU visible to torch; run with --device cpu to try the steps without one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.device, args.quick, args.budget_s, args.limit)
    for name in args.steps.split(","):
        check.step(name, getattr(check, name))
        (args.out / "gpu_check.json").write_text(json.dumps(check.report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(check.report))
    print(markdown(check.report))
    failed = [name for name, part in check.report.items() if isinstance(part, dict) and "error" in part and part["error"]]
    failed += [row["row"] for part in check.report.values() if isinstance(part, list) for row in part if isinstance(row, dict) and row.get("error")]
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
