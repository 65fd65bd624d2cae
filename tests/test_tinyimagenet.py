import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scpl_kit.data.datasets import load_prepared
from scpl_kit.data.errors import CorruptDataError, DatasetNotFoundError
from scpl_kit.data.prepare import channel_stats, prepare_dataset
from scpl_kit.data.tinyimagenet import decode, load_tinyimagenet
from scpl_kit.prepare import main as prepare_main

WNIDS = ["n03", "n01", "n02"]  # wnids.txt is not sorted; labels follow the sorted order
SOLID = (200, 30, 90)  # val_1.JPEG: one flat colour, so resizing must keep it


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def write_fake_tinyimagenet(raw: Path, per_class: int = 4, val_per_class: int = 2) -> Path:
    """A few 64×64 JPEGs in the exact layout of tiny-imagenet-200.zip, unpacked."""
    rng = np.random.default_rng(0)
    root = raw / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\tstingray\nn03\tcock\n")
    for wnid in WNIDS:
        for i in range(per_class):
            write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    write_jpeg(root / "train" / "n02" / "images" / "n02_1.JPEG", rng.integers(0, 256, (64, 64), dtype=np.uint8))  # grayscale
    lines = []
    for k in range(val_per_class * len(WNIDS)):
        wnid = WNIDS[k % len(WNIDS)]
        pixels = np.full((64, 64, 3), SOLID, dtype=np.uint8) if k == 1 else rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        write_jpeg(root / "val" / "images" / f"val_{k}.JPEG", pixels)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    write_jpeg(root / "test" / "images" / "test_0.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # unlabelled
    return root


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    write_fake_tinyimagenet(tmp_path / "raw")
    return tmp_path / "raw"


@pytest.mark.parametrize("size", [32, 64])
def test_prepare_gives_splits_of_the_asked_size(raw: Path, tmp_path: Path, size: int) -> None:
    out = prepare_dataset("tinyimagenet", tmp_path / "processed", raw, 0.25, None, download=False, image_size=size)
    data = load_prepared("tinyimagenet", out.parent, expect={"image_size": size})
    assert data.meta["sizes"] == {"train": 9, "val": 3, "test": 6}
    assert data.meta["image_size"] == size and data.input_shape == (3, size, size)
    for split, (images, labels) in data.splits.items():
        assert images.shape == (data.meta["sizes"][split], 3, size, size) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [data.meta["sizes"][split] // 3] * 3
    assert data.meta["classes"] == ["n01 goldfish", "n02 stingray", "n03 cock"]


def test_data_prepared_at_another_size_is_refused(raw: Path, tmp_path: Path) -> None:
    out = prepare_dataset("tinyimagenet", tmp_path / "processed", raw, 0.25, None, download=False, image_size=64)
    with pytest.raises(CorruptDataError, match="image_size=64 but the config asks for 32.*data=tinyimagenet data.image_size=32"):
        load_prepared("tinyimagenet", out.parent, expect={"image_size": 32})


def test_prepare_command_passes_image_size_through(raw: Path, tmp_path: Path) -> None:
    overrides = ["data=tinyimagenet", f"data.raw_dir={raw}", f"data.processed_dir={tmp_path / 'p'}", "data.val_fraction=0.25", "data.image_size=64"]
    assert prepare_main(overrides) == 0
    assert load_prepared("tinyimagenet", tmp_path / "p").meta["image_size"] == 64


def test_test_split_is_the_labelled_official_validation_set(raw: Path) -> None:
    data = load_tinyimagenet(raw, download=False)
    # val_k is labelled WNIDS[k % 3] by val_annotations.txt; labels index the sorted wnids
    assert data.test_labels.tolist() == [sorted(WNIDS).index(WNIDS[k % 3]) for k in range(6)]
    solid = data.test_images[1].astype(int)
    assert solid.shape == (3, 32, 32) and np.abs(solid - np.array(SOLID)[:, None, None]).max() <= 3
    assert np.bincount(data.labels).tolist() == [4, 4, 4]


def test_grayscale_jpeg_becomes_three_equal_channels(raw: Path) -> None:
    data = load_tinyimagenet(raw, download=False)
    gray = data.images[4 + 1]  # class n02 (label 1), second file n02_1.JPEG
    assert gray.shape == (3, 32, 32) and np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    assert not np.array_equal(data.images[4][0], data.images[4][1])  # its neighbours are colour images


def test_resizing_matches_the_papers_torchvision_resize(raw: Path) -> None:
    from torchvision import transforms

    path = raw / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_0.JPEG"
    expected = np.asarray(transforms.Resize(32)(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
    assert np.array_equal(decode(str(path), 32), expected)


def test_missing_copy_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"(?s)curl -L .*tiny-imagenet-200.zip.*unzip.*SCPL_DATA_DIR"):
        load_tinyimagenet(tmp_path, download=False)


@pytest.mark.parametrize("missing", ["wnids.txt", "train/n02", "val/val_annotations.txt", "val/images/val_4.JPEG"])
def test_incomplete_copy_names_what_is_missing(raw: Path, missing: str) -> None:
    path = raw / "tiny-imagenet-200" / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DatasetNotFoundError, match="incomplete") as error:
        load_tinyimagenet(raw, download=False)
    named = "train/n02/images/*.JPEG" if missing == "train/n02" else missing
    assert f"{named} is missing" in str(error.value) and "\n" not in str(error.value)


def test_undecodable_jpeg_is_named(raw: Path) -> None:
    path = raw / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptDataError, match="val_2.JPEG cannot be decoded"):
        load_tinyimagenet(raw, download=False)


@pytest.mark.parametrize("size", [48, "32", None])
def test_invalid_image_size_names_the_valid_ones(raw: Path, size: object) -> None:
    with pytest.raises(ValueError, match=r"image_size=.*valid sizes: 32 .* or 64"):
        load_tinyimagenet(raw, download=False, image_size=size)


def test_chunked_channel_stats_equal_numpy_whole_array_ones() -> None:
    """The chunked statistics keep meta.json of data prepared before bit for bit."""
    rng = np.random.default_rng(0)
    for shape in [(3000, 3, 32, 32), (500, 1, 28, 28)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels = images.astype(np.float64) / 255.0
        whole = (pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist())
        assert channel_stats(images) == whole
        if shape[1] == 3:
            assert channel_stats(images, max_bytes=1 << 20) == whole  # 42 images a chunk
