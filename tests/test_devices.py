"""Devices and backends chosen in one place (devices.py), files that load on a host without the GPU they
were written on, and a training step during which the host never waits for the device."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from scpl_kit import devices
from scpl_kit.devices import DeviceError, backend_for, on_cpu, resolve_device
from scpl_kit.engines.base import PeerError, reports_peer_failures
from scpl_kit.preflight import PreflightError, check_devices
from scpl_kit.train import build, load_data, main, run, update_recipe
from scpl_kit.trainer import Checkpoint, Trainer
from scpl_kit.updater import CHECK_EVERY, FiniteWatch, NonFiniteLossError

from test_training import history, same_weights, weights


def test_device_forms_and_their_errors(monkeypatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")  # no GPU here
    with pytest.raises(DeviceError, match=r"device 'gpu' is not one of auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match=r"asks for a GPU but this machine has none"):
        resolve_device("cuda:0")
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)  # a machine with two GPUs
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # each rank its own GPU
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # named: every rank shares it
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=2 would use cuda:2, but this machine has 2 GPUs .*gpus_per_node=2"):
        resolve_device("auto", local_rank=2)
    with pytest.raises(DeviceError, match=r"device 'cuda:2': this machine has 2 GPUs \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:2")


def test_the_backend_follows_the_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert backend_for(cpu) == "gloo" and backend_for(gpu) == "nccl"
    assert backend_for(gpu, "gloo") == "gloo"  # ranks sharing one GPU: the transport stages through the host
    with pytest.raises(DeviceError, match=r"engine.backend=nccl carries CUDA tensors only, but this process computes on cpu"):
        backend_for(cpu, "nccl")
    with pytest.raises(DeviceError, match=r"engine.backend='mpi' is not one of auto, gloo, nccl"):
        backend_for(cpu, "mpi")


def test_preflight_refuses_a_device_the_machine_lacks_in_one_line(smoke_config, capsys) -> None:
    with pytest.raises(PreflightError, match=r"^engine.device: device 'cuda:1' asks for a GPU"):
        check_devices(smoke_config("engine.device=cuda:1"))
    with pytest.raises(PreflightError, match=r"^engine.devices\[1\]: device 'cuda'"):
        check_devices(OmegaConf.create({"engine": {"name": "threads", "devices": ["cpu", "cuda"]}}))
    check_devices(smoke_config("engine.device=cpu"))  # what the machine has passes
    assert main(["profile=smoke", "engine.device=cuda:1", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: engine.device: device 'cuda:1' asks for a GPU") and err.count("\n") == 1


def test_a_backend_error_is_reported_as_itself_and_only_a_silence_as_a_lost_peer() -> None:
    class Job:
        rank, timeout_s = 1, 5.0

        @reports_peer_failures
        def fail(self, message: str) -> None:
            raise dist.DistBackendError(message)

    with pytest.raises(dist.DistBackendError, match="invalid device ordinal"):
        Job().fail("NCCL error: invalid device ordinal")
    with pytest.raises(PeerError, match=r"rank 1: another rank stopped answering .* Backend: Timed out"):
        Job().fail("Timed out waiting 5000ms for recv operation to complete")


def test_states_are_copied_to_the_cpu_and_keep_their_versions() -> None:
    module = torch.nn.BatchNorm1d(3)
    state = module.state_dict()
    copied = on_cpu({"units": [{"module": state, "steps": 4}], "pair": (torch.ones(2), "x")})
    kept = copied["units"][0]["module"]
    assert kept["weight"].data_ptr() != state["weight"].data_ptr()  # a copy: training on does not change it
    assert kept._metadata == state._metadata and copied["pair"][1] == "x" and copied["units"][0]["steps"] == 4
    module.load_state_dict(kept)


@contextlib.contextmanager
def saved_as_if_on_a_gpu() -> Iterator[None]:
    """torch.save tags every storage with where it lives; this tags CPU storages `cuda:7`, as a GPU run
    would, and reading such a storage back without map_location fails as on a host without that GPU."""
    registry = torch.serialization._package_registry
    entry = (0, lambda storage: "cuda:7", lambda storage, location: None)
    registry.append(entry)
    registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        registry.remove(entry)


def resaved_from_a_gpu(path: Path) -> None:
    data = torch.load(path, weights_only=False)
    with saved_as_if_on_a_gpu():
        buffer = io.BytesIO()
        torch.save(data, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(RuntimeError, match="CUDA"):  # what a CPU-only host says to torch.load without map_location
        torch.load(path, weights_only=False)


def test_a_gpu_runs_checkpoint_and_weights_load_on_a_cpu_only_host(smoke_config, tmp_path: Path, monkeypatch) -> None:
    """A run killed in epoch 2 whose checkpoint a GPU wrote resumes on the CPU to the uninterrupted run's
    weights; its model.pt (written from a GPU too) evaluates on the CPU."""
    from scpl_kit.evaluate import evaluate_run

    reference = run(smoke_config("out_dir=" + str(tmp_path / "ref"), f"trainer.checkpoint_dir={tmp_path / 'ref_ckpt'}"))
    real_run_epoch = Trainer.run_epoch

    def killed_in_epoch_2(self: Trainer, epoch: int) -> dict:
        if epoch == 2:
            raise KeyboardInterrupt
        return real_run_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(smoke_config())
    monkeypatch.setattr(Trainer, "run_epoch", real_run_epoch)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.pt")
    resaved_from_a_gpu(checkpoint)
    assert Checkpoint(checkpoint).load()["epoch"] == 1
    resumed = run(smoke_config())
    assert resumed["test_acc"] == reference["test_acc"] and same_weights(weights(tmp_path / "out"), weights(tmp_path / "ref"))
    assert len(history(tmp_path / "out")) == 2
    resaved_from_a_gpu(tmp_path / "out" / "model.pt")
    assert evaluate_run(tmp_path / "out")["matches_training"]


def test_a_non_finite_loss_is_caught_at_the_next_check_with_its_first_step() -> None:
    watch = FiniteWatch("block2")
    for step in range(1, CHECK_EVERY):
        value = float("nan") if step in (7, 9) else 1.0
        watch.note({"block2/supcon": torch.tensor(value), "block2/ce": torch.tensor(2.0)}, step)  # no raise: nothing read yet
    with pytest.raises(NonFiniteLossError, match=r"non-finite block2/supcon loss \(nan\) in block2 at step 7"):
        watch.check()
    finite = FiniteWatch("block1")
    for step in range(1, 2 * CHECK_EVERY + 1):
        finite.note({"block1/supcon": torch.tensor(1.0)}, step)
    finite.check()


SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")  # a GPU tensor's value read on the host


def host_reads_per_step(cfg, steps: int = 3) -> dict[str, int]:
    """Train `steps` batches on the configured engine under the profiler (after one unprofiled batch) and
    count the ops that make the host wait for the device (on a GPU; on the CPU they are counted the same way)."""
    from scpl_kit.engines import build_engine
    from scpl_kit.train import options

    data = load_data(cfg)
    model, units = build(cfg, data)
    engine = build_engine(cfg.engine.name, **options(cfg.engine))
    try:
        engine.setup(units, model.example_batch(cfg.trainer.batch_size, data.num_classes), update_recipe(cfg, data))
        batches = list(data.loader("train", cfg.trainer.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)))[: steps + 1]
        signals = engine.batches_here(batches)  # the engine's own way in: a pipeline's later stage receives
        engine.train_batch(next(signals)[0])  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for signal, _ in signals:
                engine.train_batch(signal)
            engine.finish_batches()
    finally:
        engine.close()
    counts = {name: 0 for name in SYNCS}
    for event in profiler.events():
        if event.name in counts and not within_fused_optimizer(event):
            counts[event.name] += 1
    return counts


def within_fused_optimizer(event) -> bool:
    """The CPU's fused Adam kernel reads each parameter's step count from its tensor (an item() per
    tensor); the CUDA kernel reads it on the device. Not a host wait on a GPU, so not counted."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::_fused_"):
            return True
        parent = parent.cpu_parent
    return False


@pytest.mark.parametrize("method", ["scpl", "bp", "al", "infopro"])
def test_a_training_step_never_reads_a_device_value_on_the_host(smoke_config, method: str) -> None:
    """Losses are checked for NaN on the device (every CHECK_EVERY steps on the host), SupCon builds its
    masks on the device: a GPU runs ahead of the host through the whole step."""
    assert host_reads_per_step(smoke_config(f"method={method}")) == {name: 0 for name in SYNCS}


def _pipeline_reads(rank: int, result_dir: str, cfg) -> None:
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(host_reads_per_step(cfg)))


@pytest.mark.slow  # two processes: ~15 s
def test_a_pipeline_step_never_reads_a_device_value_on_the_host(smoke_config, tmp_path: Path) -> None:
    """Both stages of SCPL's pipeline, the receiving one included: layouts come over the host group."""
    from test_data_parallel import reporting_errors
    from test_engines import spawn_ranks

    cfg = smoke_config("method=scpl", "engine=pipeline", "engine.stages=[[0,1],[2,3]]", "engine.timeout_s=60", "trainer.threads=1")
    reports = spawn_ranks(reporting_errors(_pipeline_reads), 2, tmp_path, cfg)
    assert sorted(reports) == ["rank0.json", "rank1.json"], reports
    assert [json.loads(reports[f"rank{r}.json"]) for r in range(2)] == [{name: 0 for name in SYNCS}] * 2


def test_a_transformer_step_never_reads_a_device_value_on_the_host(text_smoke_config) -> None:
    assert host_reads_per_step(text_smoke_config("model=transformer", "method=scpl")) == {name: 0 for name in SYNCS}


def test_lengths_stay_on_the_host_when_a_signal_moves() -> None:
    """What the LSTM packs by (and PackedSequence's batch sizes) live on the host on every device, so
    reading them never waits for a GPU; the Transformer copies them over without waiting."""
    from scpl_kit.signal import moved

    signal = {"features": torch.zeros(2, 3, dtype=torch.long), "lengths": torch.tensor([3, 1]), "labels": torch.tensor([0, 1])}
    placed = moved(signal, torch.device("meta"))  # another device than the host's, even here
    assert placed["features"].is_meta and placed["labels"].is_meta and placed["lengths"].device.type == "cpu"


@pytest.mark.slow  # a few toy runs in one process and two 2-rank jobs: ~1 min
def test_the_gpu_check_runs_its_steps_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.py at toy sizes on the CPU: every step's code runs (the GPU is what the CPU cannot show)."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--limit", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(row["augmentation"], row["workers"]) for row in report["loader"]] == [("none", 0), ("strong", 0), ("strong", 2)]
    assert all(row["views_per_s"] > 0 for row in report["loader"])
    assert [row["row"] for row in report["sweep"]] == ["vgg8 bp", "vgg8 scpl"] and all(row["samples_per_s"] > 0 for row in report["sweep"])
    assert [row["row"] for row in report["engines"]] == ["threads scpl", "pipeline scpl 2 ranks on cpu (gloo)"]
    assert report["engines"][1]["rc"] == 0 and report["engines"][1]["samples_per_s"] > 0
    assert report["checkpoint"]["evaluate_rc"] == 0 and report["checkpoint"]["matches_training"] is True
    assert "## sweep" in (tmp_path / "gpu_check.md").read_text()
