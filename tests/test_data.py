"""timm_kd.data: the embedded dataset, loading local folders / Hub ids, bad input, loaders."""
from __future__ import annotations

import os
import random
import time

import datasets
import numpy as np
import pytest
import timm
import torch
from _data_utils import write_image, write_image_folder, write_truncated_jpeg

from timm_kd import data as D
from timm_kd.data import images as data_images
from timm_kd.offline import HubUnreachableError

SMALL = {"num_train": 600, "num_test": 300}  # small splits keep the tests fast


def _pixels(ds: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in ds["image"]])


# ---------------------------------------------------------------------------------------------
# the embedded dataset
# ---------------------------------------------------------------------------------------------


def test_digits_fast_path_matches_sklearn():
    from sklearn.datasets import load_digits

    images, target = D.load_digits()
    digits = load_digits()
    np.testing.assert_allclose(images, digits.images / 16.0, atol=1e-7)
    np.testing.assert_array_equal(target, digits.target)


def test_embedded_features_and_shape():
    ds = D.make_embedded_dataset("train", **SMALL)
    assert len(ds) == 600
    assert isinstance(ds.features["image"], datasets.Image)
    label = ds.features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.num_classes == 100 and label.names[:3] == ["00", "01", "02"] and label.names[-1] == "99"
    image = ds[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    # balanced classes: 600 images, 6 per class
    assert np.bincount(ds["label"], minlength=100).tolist() == [6] * 100
    assert D.get_label_names(ds) == D.EMBEDDED_CLASS_NAMES and D.get_num_classes(ds) == 100
    big = D.make_embedded_dataset("test", image_size=48, num_test=10)
    assert big[0]["image"].size == (48, 48)


def test_embedded_is_deterministic_from_seed():
    a = D.make_embedded_dataset("train", seed=3, **SMALL)
    b = D.make_embedded_dataset("train", seed=3, **SMALL)
    c = D.make_embedded_dataset("train", seed=4, **SMALL)
    assert a.data.table.equals(b.data.table)  # byte for byte, PNGs included
    assert a["label"] != c["label"]
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_embedded_train_and_test_use_disjoint_digit_images():
    _, target = D.load_digits()
    pools = D.embedded_source_pools(seed=0, num_source_digits=150)
    assert set(pools["train"]).isdisjoint(pools["test"])
    assert len(pools["train"]) == 150 and len(set(pools["train"])) == 150
    assert np.bincount(target[pools["train"]], minlength=10).tolist() == [15] * 10
    assert len(pools["test"]) == 599  # a third of each digit's images
    everything = D.embedded_source_pools(seed=0, num_source_digits=None)
    assert len(everything["train"]) == 1797 - 599
    assert set(pools["train"]) <= set(everything["train"])  # more source digits = a superset

    train = D.make_embedded_dataset("train", with_sources=True, num_train=1500, num_test=10)
    test = D.make_embedded_dataset("test", with_sources=True, num_train=10, num_test=600)
    train_sources = set(train["source_left"]) | set(train["source_right"])
    test_sources = set(test["source_left"]) | set(test["source_right"])
    assert train_sources == set(pools["train"].tolist())  # 1,500 pairs use all 150 images
    assert test_sources <= set(pools["test"].tolist())
    assert train_sources.isdisjoint(test_sources)
    for ds in (train, test):  # each image shows its label's digits
        labels = np.asarray(ds["label"])
        np.testing.assert_array_equal(target[ds["source_left"]], labels // 10)
        np.testing.assert_array_equal(target[ds["source_right"]], labels % 10)


def test_embedded_same_sources_render_identically_without_noise_and_shift():
    ds = D.make_embedded_dataset("train", noise=0.0, max_shift=0, with_sources=True, num_train=2000)
    pairs = list(zip(ds["source_left"], ds["source_right"]))
    first = {}
    for i, pair in enumerate(pairs):
        if pair in first:
            np.testing.assert_array_equal(np.asarray(ds[i]["image"]), np.asarray(ds[first[pair]]["image"]))
            break
        first[pair] = i
    else:
        pytest.fail("no repeated pair among 2,000 draws from 150 x 150 source images")


def _one_nn_accuracy(**kwargs) -> float:
    train = D.make_embedded_dataset("train", num_train=1000, **kwargs)
    test = D.make_embedded_dataset("test", num_test=300, **kwargs)
    x = _pixels(train)[..., 0].reshape(len(train), -1).astype(np.float32) / 255
    y = _pixels(test)[..., 0].reshape(len(test), -1).astype(np.float32) / 255
    distances = (y**2).sum(1)[:, None] - 2 * y @ x.T + (x**2).sum(1)[None]
    predicted = np.asarray(train["label"])[distances.argmin(1)]
    return float((predicted == np.asarray(test["label"])).mean())


def test_difficulty_knobs_make_the_task_harder():
    """A 1-nearest-neighbour classifier on pixels: clean shifted-free digits from the whole pool are
    far easier than the default's few noisy, shifted source digits."""
    easy = _one_nn_accuracy(num_source_digits=None, noise=0.0, max_shift=0)
    default = _one_nn_accuracy()
    assert easy > default + 0.2, (easy, default)
    distorted = D.make_embedded_dataset("test", num_test=20, noise=0.0, distortion=1.0, with_sources=True)
    plain = D.make_embedded_dataset("test", num_test=20, noise=0.0, distortion=0.0, with_sources=True)
    assert distorted["source_left"] == plain["source_left"]  # same pairs, other pixels
    assert not np.array_equal(_pixels(distorted), _pixels(plain))
    noisy = D.make_embedded_dataset("test", num_test=50, noise=0.5)
    clean = D.make_embedded_dataset("test", num_test=50, noise=0.0)
    assert _pixels(noisy)[:, :4].std() > 3 * _pixels(clean)[:, :4].std()  # the empty top rows


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_source_digits": 5}, "num_source_digits must be an int from 10"),
        ({"num_source_digits": 5000}, "to 1198"),
        ({"noise": -1.0}, "noise must be"),
        ({"distortion": 1.5}, r"distortion must be a number in \[0, 1\]"),
        ({"image_size": 15}, "image_size must be an even int"),
        ({"split": "validation"}, "splits 'train' and 'test'"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_embedded_bad_arguments(kwargs, match):
    split = kwargs.pop("split", "train")
    with pytest.raises(ValueError, match=match):
        D.make_embedded_dataset(split, **kwargs, num_train=10)


def test_load_embedded_by_name():
    test = D.load_image_dataset("embedded", "validation", embedded_kwargs={"num_test": 200})
    assert len(test) == 200 and test.split == "test"
    with pytest.raises(ValueError, match="available splits: train, test"):
        D.load_image_dataset("embedded", "holdout")
    with pytest.raises(ValueError, match="only apply to the 'embedded' dataset"):
        D.load_image_dataset("uoft-cs/cifar100", "train", embedded_kwargs={"seed": 1})


# ---------------------------------------------------------------------------------------------
# local folders, Hub ids, bad input
# ---------------------------------------------------------------------------------------------


def test_image_folder_with_png_and_jpeg(tmp_path):
    counts = write_image_folder(str(tmp_path), {"cat": 3, "dog": 2, "eel": 2})
    train = D.load_image_dataset(str(tmp_path), "train")
    assert len(train) == counts["train"] == 7
    assert D.get_label_names(train) == ["cat", "dog", "eel"]
    assert train.column_names == ["image", "label"]
    assert sorted(train["label"]) == [0, 0, 0, 1, 1, 2, 2]
    assert train[0]["image"].size == (24, 20)
    val = D.load_image_dataset(str(tmp_path), "val")  # alias of "validation"
    assert len(val) == counts["validation"]
    with pytest.raises(ValueError, match=r"no split 'test'; available splits: train, validation"):
        D.load_image_dataset(str(tmp_path), "test")
    D.check_labels(train, 3)
    verified, corrupt = D.verify_images(train, progress=False)  # clean data: nothing to report
    assert corrupt == [] and verified is train


def test_image_folder_split_layouts_match_datasets(tmp_path):
    """The one-walk reading gives the splits datasets' own inference gives, nested or named."""
    write_image_folder(str(tmp_path / "nested" / "images"), {"cat": 2, "dog": 3})
    write_image_folder(str(tmp_path / "named"), {"cat": 2, "dog": 3}, splits=("train-a", "val-b"))
    write_image_folder(str(tmp_path / "alias"), {"cat": 2, "dog": 3}, splits=("training", "val"))
    for root in ("nested", "named", "alias"):
        train = D.load_image_dataset(str(tmp_path / root), "train")
        val = D.load_image_dataset(str(tmp_path / root), "validation")
        assert (len(train), len(val)) == (5, 5), root
        assert D.get_label_names(train) == D.get_label_names(val) == ["cat", "dog"], root
        paths = [x["path"] for x in D.undecoded(val)["image"]]
        assert all(os.sep + "train" not in p for p in paths), (root, paths)


def test_image_folder_without_class_folders_and_without_images(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / "flat" / f"{i}.png"), i)
    with pytest.raises(ValueError, match="no labels.*one sub-folder per class"):
        D.load_image_dataset(str(tmp_path / "flat"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no images"):
        D.load_image_dataset(str(tmp_path / "empty"), "train")


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    for missing in (str(tmp_path / "nope"), "./no/such/folder", "data/imagenet/train", "~/nowhere-xyz"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            D.load_image_dataset(missing, "train")
    file = tmp_path / "a.png"
    write_image(str(file), 0)
    with pytest.raises(ValueError, match="is a file"):
        D.load_image_dataset(str(file), "train")


def test_hub_id_offline_fails_fast_with_a_clear_error():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest.py
    start = time.perf_counter()
    expected = r"dataset 'timm-kd-tests/no-such-set' .* Hugging Face Hub, but HF_HUB_OFFLINE=1 is set"
    with pytest.raises(HubUnreachableError, match=expected):
        D.load_image_dataset("timm-kd-tests/no-such-set", "train")
    with pytest.raises(HubUnreachableError, match="from the Hugging Face Hub"):
        D.load_image_dataset("imagenet-1k", "validation", streaming=True)
    assert time.perf_counter() - start < 30  # no network wait


def _write_table_dataset(root, splits: dict[str, int]) -> dict[str, datasets.Dataset]:
    """Tiny image datasets (PNG bytes inside the rows, a ClassLabel) per split."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b", "c"]))
    made = {}
    for split, n in splits.items():
        rng = np.random.default_rng(len(split))
        rows = {
            "image": [datasets.Image().encode_example(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
                      for _ in range(n)],
            "label": [i % 3 for i in range(n)],
        }
        made[split] = datasets.Dataset.from_dict(rows, features=features)
    return made


def test_hub_layout_folders_and_data_files(tmp_path):
    """What datasets.load_dataset takes: a Hub-layout folder (parquet, arrow), a data file, a glob."""
    made = _write_table_dataset(tmp_path, {"train": 9, "validation": 6})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, ds in made.items():
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    train = D.load_image_dataset(str(tmp_path / "hub"), "train")
    assert len(train) == 9 and train.column_names == ["image", "label"]
    assert D.get_label_names(train) == ["a", "b", "c"]
    assert train[0]["image"].size == (5, 6)
    assert len(D.load_image_dataset(str(tmp_path / "hub"), "val")) == 6  # alias of validation
    with pytest.raises(ValueError, match="no split 'test'.*--val-fraction"):
        D.load_image_dataset(str(tmp_path / "hub"), "test")

    # arrow files in the same layout (the files save_to_disk writes, renamed as a Hub repo names them)
    for split, ds in made.items():
        ds.save_to_disk(str(tmp_path / "saved" / split))
        (tmp_path / "arrow" / "data").mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path / "saved" / split / "data-00000-of-00001.arrow",
                   tmp_path / "arrow" / "data" / f"{split}-00000-of-00001.arrow")
    assert len(D.load_image_dataset(str(tmp_path / "arrow"), "validation")) == 6

    # a csv of image file paths and integer labels
    write_image_folder(str(tmp_path / "png"), {"a": 2, "b": 2}, splits=("train",))
    pngs = sorted(str(p) for p in (tmp_path / "png").rglob("*.*"))
    (tmp_path / "csv" / "data").mkdir(parents=True)
    (tmp_path / "csv" / "data" / "train.csv").write_text(
        "image,label\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(pngs))
    )
    from_csv = D.load_image_dataset(str(tmp_path / "csv"), "train")
    assert len(from_csv) == 4 and from_csv[0]["image"].size == (24, 20)

    # one data file (or a glob) is the train split
    file = str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    assert len(D.load_image_dataset(file, "train")) == 9
    assert len(D.load_image_dataset(str(tmp_path / "hub" / "data" / "*.parquet"), "train")) == 15
    with pytest.raises(ValueError, match="one data file: it holds the 'train' split only.*--val-fraction"):
        D.load_image_dataset(file, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_image_dataset("missing.parquet", "train")  # a file name is never a Hub id


def test_local_folders_do_not_log_downloading(tmp_path, capfd):
    write_image_folder(str(tmp_path), {f"c{i}": 6 for i in range(10)}, splits=("train",))
    datasets.enable_progress_bars()
    D.load_image_dataset(str(tmp_path), "train")
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err, err
    assert datasets.is_progress_bar_enabled()  # restored


def test_split_validation_is_seeded_stratified_and_disjoint(tmp_path):
    write_image_folder(str(tmp_path), {"cat": 10, "dog": 6, "eel": 2, "fox": 1}, splits=("flat",))
    flat = D.load_image_dataset(str(tmp_path / "flat"), "train")
    train, val = D.split_validation(flat, 0.25, seed=3)
    labels = np.asarray(flat["label"])
    val_labels = np.asarray(val["label"])
    # round(0.25 n) per class, at least one of a class with two or more, none of a single image
    assert [int((val_labels == c).sum()) for c in range(4)] == [2, 2, 1, 0]
    assert len(train) + len(val) == len(flat)
    paths = lambda d: [x["path"] for x in D.undecoded(d)["image"]]  # noqa: E731
    assert not set(paths(train)) & set(paths(val))
    again_train, again_val = D.split_validation(flat, 0.25, seed=3)
    assert paths(again_val) == paths(val) and paths(again_train) == paths(train)
    assert paths(D.split_validation(flat, 0.25, seed=4)[1]) != paths(val)
    assert int((labels == 0).sum()) == 10
    with pytest.raises(ValueError, match="--val-fraction must be in"):
        D.split_validation(flat, 1.5)


def test_engine_holds_out_a_validation_part_and_verifies_once(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from timm_kd.engine.config import TrainConfig
    from timm_kd.engine.setup import _load_data

    write_image_folder(str(tmp_path), {"cat": 8, "dog": 8}, splits=("train",))
    config = TrainConfig(dataset=str(tmp_path), val_fraction=0.25, seed=0, student="test_resnet", method="ce")
    decodes = _count_decodes(monkeypatch)
    data = _load_data(config, Accelerator(cpu=True))
    assert (len(data.train), len(data.val), data.num_classes) == (12, 4, 2)
    assert decodes[0] == 16  # --verify-images auto: local data, every image once
    decodes[0] = 0
    again = _load_data(config, Accelerator(cpu=True))  # the next start (or a resume, a cache build)
    assert decodes[0] == 0 and len(again.train) == 12
    with pytest.raises(ValueError, match="no split 'validation'.*--val-fraction 0.1"):
        plain = TrainConfig(dataset=str(tmp_path), student="test_resnet", method="ce")
        _load_data(plain, Accelerator(cpu=True))


def test_saved_dataset_columns_detected_and_empty_split(tmp_path):
    image = datasets.Image()
    rows = {
        "img": [image.encode_example(np.zeros((4, 4, 3), np.uint8)) for _ in range(4)],
        "coarse_label": [0, 0, 1, 1],
        "fine_label": [0, 1, 2, 3],
    }
    features = datasets.Features(
        img=image,
        coarse_label=datasets.ClassLabel(names=["a", "b"]),
        fine_label=datasets.ClassLabel(names=["a0", "a1", "b0", "b1"]),
    )
    empty = datasets.Dataset.from_dict({k: [] for k in rows}, features=features)
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=features), test=empty)
    splits.save_to_disk(str(tmp_path / "saved"), num_shards={"train": 1, "test": 1})
    train = D.load_image_dataset(str(tmp_path / "saved"), "train")
    assert train.column_names == ["image", "label"]  # img -> image, fine_label (not coarse) -> label
    assert D.get_label_names(train) == ["a0", "a1", "b0", "b1"]
    with pytest.raises(ValueError, match="split 'test' of dataset .* is empty"):
        D.load_image_dataset(str(tmp_path / "saved"), "test")

    odd = datasets.Dataset.from_dict(
        {"pixels": rows["img"], "y": [0, 1, 0, 1]},
        features=datasets.Features(pixels=image, y=datasets.Value("int64")),
    )
    odd.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match=r"which column .* holds the labels.*label_column="):
        D.load_image_dataset(str(tmp_path / "odd"), "train")
    with pytest.raises(ValueError, match="image_column='picture' is not a column"):
        D.load_image_dataset(str(tmp_path / "odd"), "train", image_column="picture", label_column="y")
    loaded = D.load_image_dataset(str(tmp_path / "odd"), "train", label_column="y")
    assert loaded.column_names == ["image", "label"] and D.get_num_classes(loaded) == 2


def test_check_labels_errors():
    ds = D.make_embedded_dataset("test", num_test=100)
    D.check_labels(ds, 100)
    expected = "has 100 classes .* model has 10 outputs; create the model with num_classes=100"
    with pytest.raises(ValueError, match=expected):
        D.check_labels(ds, 10, name="embedded/test")
    plain = datasets.Dataset.from_dict({"image": [None] * 3, "label": [0, 7, 2]})
    with pytest.raises(ValueError, match="labels up to 7 .* num_classes=8"):
        D.check_labels(plain, 5)
    unlabelled = datasets.Dataset.from_dict({"image": [None] * 2, "label": [-1, -1]})
    with pytest.raises(ValueError, match="negative labels.*unlabelled split"):
        D.check_labels(unlabelled, 1000)
    # only the rows a view selects are checked
    D.check_labels(plain.select([0, 2]), 3)


def test_corrupt_jpeg_error_and_skip_policies(tmp_path):
    write_image_folder(str(tmp_path), {"cat": 3, "dog": 3}, splits=("train",))
    bad_path = tmp_path / "train" / "dog" / "broken.jpg"
    write_truncated_jpeg(str(bad_path))
    train = D.load_image_dataset(str(tmp_path), "train")
    assert len(train) == 7

    expected = r"1 of 7 images cannot be decoded: image \d+ \(.*broken\.jpg\).*truncated"
    with pytest.raises(ValueError, match=expected):
        D.verify_images(train, progress=False)
    with pytest.warns(UserWarning, match="skipping 1 corrupt image"):
        kept, corrupt = D.verify_images(train, on_corrupt="skip", progress=False)
    assert len(kept) == 6 and len(corrupt) == 1 and "broken.jpg" in corrupt[0][1]

    # during training: the error names the file; "skip" drops it in the collate and counts it
    with pytest.raises(ValueError, match=r"cannot decode image \d+ \(.*broken\.jpg\).*on_corrupt='skip'"):
        list(D.create_loader(D.apply_transform(train, None), batch_size=4))
    loader = D.create_loader(D.apply_transform(train, None, on_corrupt="skip"), batch_size=4, shuffle=True)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["label"]) for b in batches) == 6
    # streaming: the same policies
    stream = D.load_image_dataset(str(tmp_path), "train", streaming=True)
    with pytest.raises(ValueError, match="broken.jpg"):
        list(D.create_loader(D.apply_transform(stream, None), batch_size=4))
    streamed = list(D.create_loader(D.apply_transform(stream, None, on_corrupt="skip"), batch_size=4))
    assert sum(len(b["label"]) for b in streamed) == 6
    with pytest.raises(ValueError, match="on_corrupt must be 'error' or 'skip'"):
        D.apply_transform(train, None, on_corrupt="ignore")


def _count_decodes(monkeypatch) -> list[int]:
    count = [0]
    real = data_images.decode_image

    def counting(value):
        count[0] += 1
        return real(value)

    monkeypatch.setattr(data_images, "decode_image", counting)
    return count


def test_verification_is_recorded_and_not_repeated(tmp_path, monkeypatch):
    write_image_folder(str(tmp_path / "data"), {"cat": 4, "dog": 4}, splits=("train",))
    bad = tmp_path / "data" / "train" / "dog" / "broken.jpg"
    write_truncated_jpeg(str(bad))
    records = str(tmp_path / "records")
    decodes = _count_decodes(monkeypatch)

    def start(on_corrupt="skip"):  # what each launch does: load, verify
        train = D.load_image_dataset(str(tmp_path / "data"), "train")
        decodes[0] = 0
        with pytest.warns(UserWarning, match="skipping 1 corrupt"):
            kept, corrupt = D.verify_images(
                train, on_corrupt=on_corrupt, progress=False, record_dir=records, num_proc=1
            )
        return len(kept), [what for _, what in corrupt]

    first = start()
    assert decodes[0] == 9 and first[0] == 8 and "broken.jpg" in first[1][0]
    assert len(os.listdir(records)) == 1
    assert start() == first and decodes[0] == 0  # the second start decodes nothing
    train = D.load_image_dataset(str(tmp_path / "data"), "train")
    with pytest.raises(ValueError, match="1 of 9 images cannot be decoded.*broken.jpg"):
        D.verify_images(train, progress=False, record_dir=records)  # the policy applies to the record
    assert decodes[0] == 0

    # a replaced file (new size and mtime) is verified again
    write_image(str(bad), 99)
    os.utime(bad, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    train = D.load_image_dataset(str(tmp_path / "data"), "train")
    decodes[0] = 0
    kept, corrupt = D.verify_images(train, progress=False, record_dir=records)
    assert corrupt == [] and decodes[0] == 9 and len(kept) == 9
    decodes[0] = 0
    D.verify_images(train, progress=False, record_dir=None)  # no record: always decodes
    assert decodes[0] == 9


def test_collate_rejects_an_all_corrupt_batch():
    with pytest.raises(ValueError, match="all 2 images of a batch are corrupt"):
        D.collate_images([{"pixel_values": None, "label": 0, "index": 3}] * 2)


# ---------------------------------------------------------------------------------------------
# transforms and loaders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_small():
    return D.make_embedded_dataset("train", num_train=64)


@pytest.fixture(scope="module")
def train_transform():
    model = timm.create_model("test_resnet", num_classes=100)
    return D.create_timm_transform(model, is_training=True, dataset_name="embedded")


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(b["index"].clone(), b["pixel_values"].clone()) for b in loader]


def test_timm_transform_for_the_embedded_dataset(train_transform):
    model = timm.create_model("test_resnet", num_classes=100)
    config = D.resolve_model_data_config(model, dataset_name="embedded")
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    assert D.resolve_model_data_config(model)["input_size"] == (3, 160, 160)  # timm's own default
    text = repr(train_transform)
    assert "RandomHorizontalFlip" not in text and "size=(32, 32)" in text
    evaluation = D.create_timm_transform(model, is_training=False, dataset_name="embedded")
    image = D.make_embedded_dataset("test", num_test=1)[0]["image"]
    assert evaluation(image).shape == (3, 32, 32)


def test_loader_is_a_pure_function_of_the_seed(embedded_small, train_transform):
    def make(seed, workers=0):
        return D.create_loader(
            D.apply_transform(embedded_small, train_transform, seed=seed),
            batch_size=16, shuffle=True, seed=seed, num_workers=workers,
        )

    first, again, other = make(0), make(0), make(1)
    epoch0 = _epoch(first, 0)
    for (i_a, x_a), (i_b, x_b) in zip(epoch0, _epoch(again, 0)):
        assert torch.equal(i_a, i_b) and torch.equal(x_a, x_b)
    assert not torch.equal(epoch0[0][0], _epoch(other, 0)[0][0])
    epoch1 = _epoch(first, 1)
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # a new order each epoch
    assert sorted(torch.cat([i for i, _ in epoch1]).tolist()) == list(range(64))
    # a sample's augmented view depends on (seed, epoch, index) only: not on batch position,
    # not on worker processes, not on batches skipped before it (resume)
    index, pixels = epoch1[2][0][5].item(), epoch1[2][1][5]
    assert torch.equal(first.dataset[(index, 1)]["pixel_values"], pixels)
    assert not torch.equal(first.dataset[(index, 0)]["pixel_values"], pixels)
    with_worker = _epoch(make(0, workers=1), 1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch1, with_worker))


def test_loader_leaves_global_rngs_alone(embedded_small, train_transform):
    loader = D.create_loader(D.apply_transform(embedded_small, train_transform), batch_size=32, shuffle=True)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    list(loader)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert torch.equal(after[0], torch.rand(3))
    assert after[1] == random.random() and after[2] == np.random.rand()


def test_sampler_epochs_and_accelerate_style_set_epoch():
    sampler = D.SeededSampler(10, shuffle=True, seed=7)
    first = list(sampler)
    assert {e for _, e in first} == {0} and sorted(i for i, _ in first) == list(range(10))
    second = list(sampler)  # a full pass advances the epoch
    assert {e for _, e in second} == {1} and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert [i for i, _ in D.SeededSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_streaming_matches_map_style(embedded_small):
    stream = D.load_image_dataset("embedded", "train", streaming=True, embedded_kwargs={"num_train": 64})
    assert isinstance(stream, datasets.IterableDataset)
    streamed = list(D.create_loader(D.apply_transform(stream, None), batch_size=32))
    mapped = list(D.create_loader(D.apply_transform(embedded_small, None), batch_size=32))
    assert "num_skipped" not in streamed[0]  # Accelerate's dispatcher concatenates tensors only
    for s, m in zip(streamed, mapped):
        assert torch.equal(s["label"], m["label"]) and torch.equal(s["pixel_values"], m["pixel_values"])
    with pytest.raises(TypeError, match="apply_transform"):
        D.create_loader(embedded_small, batch_size=4)


def test_accelerate_prepared_loader_resumes_exactly(embedded_small, train_transform):
    """Accelerate keeps the SeededSampler, drives its epoch, and ``skip_first_batches`` (resume in
    the middle of an epoch) gives exactly the rest of the uninterrupted epoch, augmentations included."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)

    def prepared():
        dataset = D.apply_transform(embedded_small, train_transform, seed=0)
        return accelerator.prepare(D.create_loader(dataset, batch_size=8, shuffle=True, seed=0))

    loader = prepared()
    first = [(b["index"], b["pixel_values"]) for b in loader]  # Accelerate sets epoch 0, then 1
    second = [(b["index"], b["pixel_values"]) for b in loader]
    assert not torch.equal(first[0][0], second[0][0])
    resumed = accelerator.skip_first_batches(prepared(), 3)
    resumed.set_epoch(1)
    rest = [(b["index"], b["pixel_values"]) for b in resumed]
    assert len(rest) == len(second) - 3
    for (i_a, x_a), (i_b, x_b) in zip(rest, second[3:]):
        assert torch.equal(i_a, i_b) and torch.equal(x_a, x_b)
