import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from scpl_kit.data.augment import Augmentation
from scpl_kit.data.datasets import load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import prepare_dataset
from scpl_kit.data.share import Share
from scpl_kit.data.sources import load_cifar
from scpl_kit.registry import UnknownNameError


def test_mnist5k_splits_are_stratified_and_compact(processed_dir: Path) -> None:
    data = load_prepared("mnist5k", processed_dir)
    assert data.meta["sizes"] == {"train": 3500, "val": 500, "test": 1000}
    for split, expected in (("train", 350), ("val", 50), ("test", 100)):
        images, labels = data.splits[split]
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 28, 28)
        assert isinstance(images, np.memmap)  # read from disk on demand, never decoded again
        assert np.bincount(labels).tolist() == [expected] * 10


def test_prepare_is_deterministic(processed_dir: Path, tmp_path: Path) -> None:
    prepare_dataset("mnist5k", tmp_path, tmp_path / "raw", 0.1, 0.2, split_seed=0, download=False)
    first = json.loads((processed_dir / "mnist5k" / "meta.json").read_text())["sha256"]
    assert json.loads((tmp_path / "mnist5k" / "meta.json").read_text())["sha256"] == first


def test_loader_batches_are_normalised(processed_dir: Path) -> None:
    data = load_prepared("mnist5k", processed_dir)
    x, y = next(iter(data.loader("train", 500)))
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1


def test_loader_batches_are_the_normalised_uint8_rows(processed_dir: Path) -> None:
    """uint8 rows leave the loader's workers; the float32 batch is made where it trains (here: the CPU)."""
    data = load_prepared("mnist5k", processed_dir)
    x, _ = next(iter(data.loader("train", 64, device=torch.device("cpu"))))
    images = torch.from_numpy(np.array(data.splits["train"][0][:64]))
    mean, std = (torch.tensor(data.meta[k]).view(-1, 1, 1) for k in ("mean", "std"))
    assert torch.equal(x, (images.float() / 255 - mean) / std)


def epochs_of_batches(data, workers: int, seeds: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each seed's epoch from one loader (its workers kept between epochs), as the trainer draws them."""
    order = torch.Generator()
    loader = data.loader("train", 500, shuffle=True, augmentation=Augmentation("weak", 28, True), generator=order, num_workers=workers,
                         drop_last=True, max_batches=3)
    epochs = []
    for seed in seeds:
        order.manual_seed(seed)
        epochs.append(list(loader))
    return epochs


def test_loader_workers_give_the_same_batches_as_none(processed_dir: Path) -> None:
    """Order and augmentation are drawn in the main process (each batch carries its seed), so two
    workers, kept over epochs, make exactly the batches the main process alone makes."""
    data = load_prepared("mnist5k", processed_dir)
    alone, workers = epochs_of_batches(data, 0, [1, 2, 1]), epochs_of_batches(data, 2, [1, 2, 1])
    for mine, theirs in zip(alone, workers):
        assert len(mine) == len(theirs) == 3
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(mine, theirs))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone[0], alone[2]))  # an epoch's seed gives its batches again
    assert not torch.equal(alone[0][0][0], alone[1][0][0])  # another seed, other batches


def shared_epoch(data, share: Share, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of strongly augmented batches (two views per image) as the loader made for `share` reads them."""
    order = torch.Generator().manual_seed(5)
    return list(data.loader("train", batch_size, shuffle=True, augmentation=Augmentation("strong", 28, True), generator=order,
                            max_batches=3, share=share))


@pytest.mark.parametrize("batch_size", [64, 9])  # 9 = 5 + 4: tensor_split's uneven cut
def test_each_share_reads_its_rows_with_the_augmentation_they_get_in_the_whole_batch(processed_dir: Path, batch_size: int) -> None:
    """Two processes reading their halves of every batch get, bitwise, both views of their images as
    the whole batch has them: together, exactly the whole batch's samples."""
    data = load_prepared("mnist5k", processed_dir)
    whole = shared_epoch(data, Share(), batch_size)
    halves = [shared_epoch(data, Share(part, 2), batch_size) for part in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == 3
    for (x, y), *parts in zip(whole, *halves):
        views_x, views_y = x.unflatten(0, (2, -1)), y.unflatten(0, (2, -1))  # [view, image, ...]
        rows = torch.arange(batch_size).tensor_split(2)
        for (part_x, part_y), mine in zip(parts, rows):
            assert torch.equal(part_x, views_x[:, mine].flatten(0, 1)) and torch.equal(part_y, views_y[:, mine].flatten(0, 1))
        assert not torch.equal(views_x[0], views_x[1])  # the two views differ: the check above is not vacuous


def test_a_share_of_some_batches_reads_those_as_the_whole_sequence_has_them(processed_dir: Path) -> None:
    """The asynchronous engine's workers own whole batches: a loader reads only its own, and they are
    the batches (order, augmentation) at those positions of the sequence every worker draws."""
    data = load_prepared("mnist5k", processed_dir)
    owned = Share(owned=lambda: iter([True, False, True]))
    loader = data.loader("train", 64, shuffle=True, augmentation=Augmentation("strong", 28, True), generator=torch.Generator().manual_seed(5),
                         max_batches=3, share=owned)
    assert len(loader) == 3  # the epoch's batches: every worker counts the job's steps
    mine, whole = list(loader), shared_epoch(data, Share(), 64)
    assert len(mine) == 2
    for (x, y), (wx, wy) in zip(mine, [whole[0], whole[2]]):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def write_fake_cifar(root: Path, name: str, per_batch: int = 20) -> np.ndarray:
    """Tiny files in the exact on-disk format of the python versions of CIFAR-10/100."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, test, meta, label_key, names_key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", b"labels", b"label_names", 10
    else:
        folder, files, test, meta, label_key, names_key, classes = root / "cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names", 100
    folder.mkdir(parents=True)
    first = None
    for file in [*files, test]:
        n = per_batch * (50 if name == "cifar100" and file == "train" else 1)  # stratifying 100 classes needs ≥ 10 per class
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % classes for i in range(n)]
        with open(folder / file, "wb") as f:
            pickle.dump({b"batch_label": file.encode(), b"data": data, label_key: labels}, f)
        first = data if first is None else first
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(classes)]}, f)
    return first


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_fake_files(tmp_path: Path, name: str) -> None:
    first_batch = write_fake_cifar(tmp_path / "raw", name)
    raw = load_cifar(name, tmp_path / "raw", download=False)
    n_train = 100 if name == "cifar10" else 1000
    assert raw.images.shape == (n_train, 3, 32, 32) and raw.test_images.shape == (20, 3, 32, 32)
    # the row-major 3072 bytes are R plane, then G, then B
    assert np.array_equal(raw.images[0, 1].ravel(), first_batch[0, 1024:2048])
    out = prepare_dataset(name, tmp_path / "processed", tmp_path / "raw", val_fraction=0.1, test_fraction=None, download=False)
    data = load_prepared(name, out.parent)
    assert data.meta["sizes"] == {"train": n_train * 9 // 10, "val": n_train // 10, "test": 20}
    assert data.meta["input_shape"] == [3, 32, 32] and len(data.meta["classes"]) == (10 if name == "cifar10" else 100)
    assert np.array_equal(data.splits["test"][0], raw.test_images)  # the official test split is kept whole


def test_missing_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"(?s)cifar-10-python.tar.gz.*SCPL_DATA_DIR"):
        load_cifar("cifar10", tmp_path, download=False)


def test_missing_prepared_data_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="python -m scpl_kit.prepare data=mnist5k"):
        load_prepared("mnist5k", tmp_path)


def test_corrupt_data_is_detected(processed_dir: Path, tmp_path: Path) -> None:
    out = prepare_dataset("mnist5k", tmp_path, tmp_path / "raw", 0.1, 0.2, download=False)
    path = out / "val_images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="checksum.*python -m scpl_kit.prepare data=mnist5k"):
        load_prepared("mnist5k", tmp_path)


def test_data_prepared_with_other_split_settings_is_refused(processed_dir: Path) -> None:
    with pytest.raises(CorruptDataError, match="val_fraction=0.1 but the config asks for 0.2"):
        load_prepared("mnist5k", processed_dir, expect={"val_fraction": 0.2})


def test_unknown_dataset_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="bbcnews, cifar10, cifar100, dbpedia14"):
        prepare_dataset("imagenet", tmp_path, tmp_path, 0.1, 0.2)


@pytest.mark.parametrize(("kind", "views"), [("none", 1), ("weak", 1), ("strong", 2)])
def test_augmentation_views(kind: str, views: int) -> None:
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    out, out_labels = Augmentation(kind, 32, hflip=True)(images, labels, torch.Generator().manual_seed(1))
    assert out.shape == (8 * views, 3, 32, 32) and out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1
    assert out_labels.tolist() == labels.tolist() * views
    if kind != "none":
        assert not torch.equal(out[:8], images)
        weak = Augmentation("weak", 32, False)(images, labels, torch.Generator().manual_seed(2))[0]
        crops = {tuple(torch.nonzero(o.sum(0) == 0)[:1].flatten().tolist()) for o in weak}
        assert len(crops) > 1  # each image drew its own crop offset
        again = Augmentation(kind, 32, hflip=True)(images, labels, torch.Generator().manual_seed(1))[0]
        assert torch.equal(out, again)  # the generator's seed decides every draw


def per_image_statistics(views: torch.Tensor) -> torch.Tensor:
    """What the transforms change, per view: each channel's mean and spread, the share of padding (exact
    zeros), how grey the view is (the channels' mean gap) and how it leans left or right (a flip)."""
    half = views.shape[-1] // 2
    return torch.stack([
        *views.mean(dim=(2, 3)).T, *views.std(dim=(2, 3)).T, (views == 0).float().mean(dim=(1, 2, 3)),
        (views[:, 0] - views[:, 1]).abs().mean(dim=(1, 2)), views[..., :half].mean(dim=(1, 2, 3)) - views[..., half:].mean(dim=(1, 2, 3)),
    ], 1)


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_batched_augmentation_has_torchvisions_distribution(kind: str) -> None:
    """The batched transforms against torchvision's v2 ones applied image by image, on 4,000 views of
    one structured image (a colour gradient with a bright square off centre): every per-view statistic
    has the same mean and spread within 5 standard errors."""
    from torchvision.transforms import v2

    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([x, y, 1 - x * y]) * 0.8
    image[:, 4:12, 18:28] = torch.tensor([0.9, 0.3, 0.6]).view(3, 1, 1)
    n = 4000
    batched = Augmentation(kind, 32, hflip=True)(image.expand(n, 3, 32, 32).contiguous(), torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))[0][:n]
    weak = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    strong = [*weak, v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    transform = v2.Compose(strong if kind == "strong" else weak)
    torch.manual_seed(0)
    reference = torch.stack([transform(image) for _ in range(n)])
    ours, theirs = per_image_statistics(batched), per_image_statistics(reference)
    error = (ours.var(0) / n + theirs.var(0) / n).sqrt()
    assert ((ours.mean(0) - theirs.mean(0)).abs() <= 5 * error + 1e-4).all(), (ours.mean(0), theirs.mean(0), error)
    assert ((ours.std(0) - theirs.std(0)).abs() <= 0.1 * theirs.std(0) + 1e-3).all(), (ours.std(0), theirs.std(0))
