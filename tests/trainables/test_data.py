"""Data sources on real image files written per test: folders, splits, CSVs, bad inputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from trainables.data import (
    ImageData,
    decode_images,
    load_data,
    load_image_data,
    read_unlabelled,
    save_image_data,
)
from trainables.errors import UserError


def _write_split_folder(root: Path, parts: dict[str, int], classes: int = 3) -> None:
    rng = np.random.default_rng(3)
    for part, per_class in parts.items():
        for k in range(classes):
            for i in range(per_class):
                write_image(root / part / f"c{k}" / f"{i}.png", k, rng)


# ---------------------------------------------------------------- good inputs


def test_builtin_digits():
    data = load_data(None, image_size=32)
    assert data.images.shape == (1797, 32, 32, 3)
    assert data.images.dtype == np.uint8
    assert data.labels.shape == (1797,)
    assert data.labels.dtype == np.int64
    assert data.num_classes == 10
    assert data.class_names == [str(i) for i in range(10)]
    assert sorted(set(data.labels.tolist())) == list(range(10))
    assert len(data.ids) == 1797
    assert data.splits == {}
    # grey upscaled to RGB: the three channels are equal, and the digits are not blank
    assert np.array_equal(data.images[..., 0], data.images[..., 2])
    assert data.images.max() > 200


def test_folder_of_class_folders(make_folder):
    root = make_folder(classes=3, per_class=4)
    data = load_data(root, image_size=32)
    assert data.images.shape == (12, 32, 32, 3)
    assert data.images.dtype == np.uint8
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert np.bincount(data.labels).tolist() == [4, 4, 4]
    assert data.splits == {}
    assert data.source == str(root)
    # ids are paths relative to the root and agree with the labels
    for i, label in zip(data.ids, data.labels):
        assert not Path(i).is_absolute()
        assert Path(i).parts[0] == data.class_names[label]
    facts = data.facts()
    assert facts["num_images"] == 12 and facts["num_classes"] == 3
    assert facts["image_size"] == 32 and facts["predefined_split"] == "none"


def test_class_signal_survives_decoding(make_folder):
    """The bright square write_image draws lands where the class says (no channel/axis mixup)."""
    root = make_folder(classes=3, per_class=2)
    data = load_data(root, image_size=24)  # same size as written: no resampling blur
    for img, label in zip(data.images, data.labels):
        q = 24 // 3
        r, c = divmod(label % 9, 3)
        patch = img[r * q:(r + 1) * q, c * q:(c + 1) * q, label % 3]
        assert patch.mean() > 200


def test_train_val_test_folders_keep_their_split(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 4, "val": 2, "test": 1})
    data = load_data(root, image_size=32)
    assert data.class_names == ["c0", "c1", "c2"]
    assert set(data.splits) == {"train", "val", "test"}
    assert [len(data.splits[p]) for p in ("train", "val", "test")] == [12, 6, 3]
    everything = np.concatenate([data.splits[p] for p in ("train", "val", "test")])
    assert sorted(everything.tolist()) == list(range(len(data.labels)))
    for part, idx in data.splits.items():
        assert all(data.ids[i].startswith(f"{part}/") for i in idx)
        assert np.bincount(data.labels[idx], minlength=3).min() >= 1
    assert data.facts()["predefined_split"] == "test,train,val"


def test_train_and_val_folders_without_test(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 3, "val": 2})
    data = load_data(root, image_size=16)
    assert set(data.splits) == {"train", "val"}
    assert len(data.splits["train"]) == 9 and len(data.splits["val"]) == 6


@pytest.mark.parametrize("names", [("Train", "Valid", "Testing"),
                                   ("training", "validation", "test"), ("train", "dev", "TEST")])
def test_split_folders_go_by_the_names_users_give_them(tmp_path, names):
    root = tmp_path / "ds"
    _write_split_folder(root, dict(zip(names, (4, 2, 1))))
    data = load_data(root, image_size=16)
    assert [len(data.splits[p]) for p in ("train", "val", "test")] == [12, 6, 3]
    assert all(data.ids[i].startswith(f"{names[1]}/") for i in data.splits["val"])


def test_unknown_folder_beside_the_splits_is_named_in_a_warning(tmp_path, caplog):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 3, "test": 1, "extra": 2})
    with caplog.at_level(logging.WARNING):
        data = load_data(root, image_size=16)
    assert set(data.splits) == {"train", "test"} and len(data.labels) == 12
    assert any("extra" in r.getMessage() and "ignoring" in r.getMessage()
               for r in caplog.records)


def test_a_class_called_train_stays_a_class(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("train", "bus", "car"):  # images directly in each: class folders
        for i in range(3):
            write_image(tmp_path / "vehicles" / name / f"{i}.png", 0, rng)
    data = load_data(tmp_path / "vehicles", image_size=16)
    assert data.class_names == ["bus", "car", "train"] and data.splits == {}


def test_two_val_folders_are_refused(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 3, "val": 1, "valid": 1})
    with pytest.raises(UserError, match="two val folders"):
        load_data(root, image_size=16)


def test_csv_with_relative_paths(make_csv):
    path = make_csv(classes=3, per_class=3)
    data = load_data(path, image_size=32)
    assert data.images.shape == (9, 32, 32, 3)
    assert data.class_names == ["label_0", "label_1", "label_2"]
    assert np.bincount(data.labels).tolist() == [3, 3, 3]
    assert all(i.startswith("files/") for i in data.ids)
    assert data.source == str(path)


def test_csv_with_custom_column_names(make_csv):
    path = make_csv(classes=2, per_class=3, image_col="file", label_col="y")
    data = load_data(path, image_size=16, image_col="file", label_col="y")
    assert len(data.labels) == 6 and data.num_classes == 2


def test_csv_run_from_another_directory(make_csv, tmp_path, monkeypatch):
    """Paths are relative to the CSV, not to the working directory."""
    path = make_csv(classes=2, per_class=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = load_data(path, image_size=16)
    assert len(data.labels) == 4


def test_numeric_class_names_sort_numerically(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nums"
    for name in ("10", "2", "1"):
        for i in range(2):
            write_image(root / name / f"{i}.png", int(name), rng)
    data = load_data(root, image_size=16)
    assert data.class_names == ["1", "2", "10"]
    for i, label in zip(data.ids, data.labels):
        assert Path(i).parts[0] == data.class_names[label]


def test_text_class_names_sort_as_text(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "words"
    for k, name in enumerate(("dog", "cat", "10")):
        write_image(root / name / "a.png", k, rng)
    assert load_data(root, image_size=16).class_names == ["10", "cat", "dog"]


def test_large_jpeg_decodes_to_training_size(tmp_path):
    root = tmp_path / "big"
    big = np.zeros((1500, 1500, 3), np.uint8)
    big[:, :750, 0] = 255  # left half red
    big[:, 750:, 2] = 255  # right half blue
    (root / "a").mkdir(parents=True)
    Image.fromarray(big).save(root / "a" / "big.jpg", quality=90)
    write_image(root / "b" / "small.png", 1, np.random.default_rng(0))
    data = load_data(root, image_size=32)
    assert data.images.shape == (2, 32, 32, 3)
    img = data.images[data.ids.index(str(Path("a") / "big.jpg"))]
    assert img[:, :12, 0].mean() > 200 and img[:, :12, 2].mean() < 50
    assert img[:, -12:, 2].mean() > 200 and img[:, -12:, 0].mean() < 50


def test_non_square_image_is_centre_cropped(tmp_path):
    root = tmp_path / "wide"
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, 40:80, 1] = 255  # green centre third
    (root / "a").mkdir(parents=True)
    Image.fromarray(wide).save(root / "a" / "w.png")
    images, kept = decode_images([root / "a" / "w.png"], 20)
    assert images.shape == (1, 20, 20, 3) and kept == [0]
    assert images[0, :, :, 1].mean() > 200


def test_read_unlabelled_folder_recursive(make_folder):
    root = make_folder(classes=2, per_class=3)
    images, ids = read_unlabelled(root, image_size=16)
    assert images.shape == (6, 16, 16, 3)
    assert len(ids) == 6 and all(not Path(i).is_absolute() for i in ids)


def test_read_unlabelled_csv(make_csv):
    path = make_csv(classes=2, per_class=2)
    images, ids = read_unlabelled(path, image_size=16)
    assert images.shape == (4, 16, 16, 3)
    assert all(i.startswith("files/") for i in ids)


def test_save_and_load_image_data_round_trip(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 3, "val": 1})
    data = load_data(root, image_size=16)
    path = tmp_path / "cache" / "data.npz"
    path.parent.mkdir()
    save_image_data(data, path)
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"]  # no temp file left
    back = load_image_data(path)
    assert isinstance(back, ImageData)
    assert np.array_equal(back.images, data.images) and back.images.dtype == np.uint8
    assert np.array_equal(back.labels, data.labels)
    assert back.class_names == data.class_names
    assert back.ids == data.ids
    assert back.source == data.source
    assert set(back.splits) == set(data.splits)
    for k in data.splits:
        assert np.array_equal(back.splits[k], data.splits[k])
    assert back.facts() == data.facts()


def test_save_and_load_without_splits(tmp_path):
    data = ImageData(images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 1]),
                     class_names=["a", "b"], ids=["x", "y"], source="mem")
    save_image_data(data, tmp_path / "d.npz")
    back = load_image_data(tmp_path / "d.npz")
    assert back.splits == {} and back.class_names == ["a", "b"] and back.ids == ["x", "y"]


# ---------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope") as info:
        load_data(missing, image_size=16)
    assert "does not exist" in str(info.value)


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        load_data(empty, image_size=16)
    assert str(empty) in str(info.value)
    assert "no images" in str(info.value)


def test_class_folders_without_images(tmp_path):
    root = tmp_path / "hollow"
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images"):
        load_data(root, image_size=16)


def test_file_that_is_not_a_csv(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("image_path,target\n")
    with pytest.raises(UserError) as info:
        load_data(path, image_size=16)
    assert str(path) in str(info.value) and ".csv" in str(info.value)


def test_binary_file_named_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError) as info:
        load_data(path, image_size=16)
    assert str(path) in str(info.value)


def test_csv_missing_column_lists_available_columns(make_csv):
    path = make_csv(classes=2, per_class=2)
    with pytest.raises(UserError) as info:
        load_data(path, image_size=16, label_col="label")
    msg = str(info.value)
    assert str(path) in msg
    assert "'label'" in msg
    assert "'image_path'" in msg and "'target'" in msg


def test_csv_with_no_labelled_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image_path,target\nx.png,\n")
    with pytest.raises(UserError, match="no rows"):
        load_data(path, image_size=16)


def test_corrupt_image_is_skipped_with_a_warning(make_folder, caplog):
    root = make_folder(classes=2, per_class=3)
    bad = root / "class_1" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg \x00\xff" * 10)
    with caplog.at_level(logging.WARNING, logger="trainables.data"):
        data = load_data(root, image_size=16, on_bad_image="skip")
    assert len(data.labels) == 6  # the 6 good images, not the bad one
    assert str(Path("class_1") / "x.jpg") not in data.ids
    assert np.bincount(data.labels).tolist() == [3, 3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in r.getMessage() for r in warnings)


def test_corrupt_image_raises_under_error(make_folder):
    root = make_folder(classes=2, per_class=3)
    bad = root / "class_0" / "x.jpg"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(UserError) as info:
        load_data(root, image_size=16, on_bad_image="error")
    assert str(bad) in str(info.value)


def test_truncated_jpeg_is_named(make_folder):
    root = make_folder(classes=2, per_class=2)
    good = root / "class_0" / "img_0.jpg"
    bad = root / "class_0" / "cut.jpg"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UserError, match="cut.jpg"):
        load_data(root, image_size=16, on_bad_image="error")


def test_all_images_unreadable(tmp_path):
    root = tmp_path / "junk"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="could be read"):
        load_data(root, image_size=16)


def test_bad_on_bad_image_value(make_folder):
    with pytest.raises(UserError, match="on-bad-image"):
        load_data(make_folder(classes=1, per_class=1), image_size=16, on_bad_image="ignore")


def test_val_class_missing_from_train(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"train": 2, "val": 1}, classes=2)
    write_image(root / "val" / "zebra" / "z.png", 2, np.random.default_rng(0))
    with pytest.raises(UserError) as info:
        load_data(root, image_size=16)
    msg = str(info.value)
    assert "zebra" in msg and str(root / "val") in msg


def test_val_folder_without_train_folder(tmp_path):
    root = tmp_path / "ds"
    _write_split_folder(root, {"val": 1}, classes=2)
    with pytest.raises(UserError, match="train/"):
        load_data(root, image_size=16)


def test_read_unlabelled_folder_without_images(tmp_path):
    root = tmp_path / "nothing"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(UserError) as info:
        read_unlabelled(root, image_size=16)
    assert str(root) in str(info.value) and "no images" in str(info.value)


def test_read_unlabelled_missing_path(tmp_path):
    with pytest.raises(UserError, match="gone"):
        read_unlabelled(tmp_path / "gone", image_size=16)


def test_read_unlabelled_csv_missing_column(make_csv):
    path = make_csv(classes=1, per_class=1)
    with pytest.raises(UserError) as info:
        read_unlabelled(path, image_size=16, image_col="file")
    assert "'file'" in str(info.value) and "'image_path'" in str(info.value)


# ---------------------------------------------------------------- data that used to slip through


def test_photo_over_pillows_bomb_limit_is_read(tmp_path):
    """A 182-megapixel phone photo is over Pillow's default limit (179 MP); it is a photo."""
    big = tmp_path / "big.jpg"
    Image.new("L", (13500, 13500), color=200).save(big, quality=50)
    images, kept = decode_images([big], 16)
    assert kept == [0] and abs(int(images[0].mean()) - 200) <= 2


def _png_header_only(path: Path, width: int, height: int) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_skipped_with_a_warning_or_refused(tmp_path, caplog):
    root = tmp_path / "ds"
    for k in range(2):
        for i in range(3):
            write_image(root / f"c{k}" / f"{i}.png", k, np.random.default_rng(i))
    _png_header_only(root / "c0" / "bomb.png", 60000, 60000)  # 3.6 gigapixels
    with caplog.at_level(logging.WARNING):
        data = load_data(root, image_size=16)
    assert len(data.labels) == 6
    assert any("bomb.png" in r.getMessage() and "pixels" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(UserError, match="bomb.png"):
        load_data(root, image_size=16, on_bad_image="error")


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    images, _ = decode_images([tmp_path / "deep.png"], 64)
    row = images[0, 0, :, 0].astype(int)
    assert row[0] <= 5 and row[-1] >= 250 and 100 <= row[32] <= 160
    assert (images[0] == 255).mean() < 0.1  # Pillow's own conversion made 99 % of it white


def test_one_class_is_refused(make_folder):
    with pytest.raises(UserError, match="one class"):
        load_data(make_folder(classes=1, per_class=4), image_size=16)


def test_symlink_back_to_the_data_is_not_a_class(make_folder, caplog):
    root = make_folder(classes=2, per_class=3)
    (root / "everything").symlink_to(root, target_is_directory=True)
    (root / "again").symlink_to(root / "class_0", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        data = load_data(root, image_size=16)
    assert data.class_names == ["class_0", "class_1"] and len(data.labels) == 6
    assert sum("ignoring folder" in r.getMessage() for r in caplog.records) == 2


def _csv_rows(root: Path, header: str, classes: int, per_class: int, cells) -> list[str]:
    """Writes images root/<k>_<i>.png; the CSV's lines, `cells(k, i)` after each file name."""
    rng = np.random.default_rng(0)
    rows = [header]
    for k in range(classes):
        for i in range(per_class):
            write_image(root / f"{k}_{i}.png", k, rng)
            rows.append(f"{k}_{i}.png,{cells(k, i)}")
    return rows


def test_duplicate_csv_rows_are_used_once_and_copies_share_a_split(tmp_path, caplog):
    from trainables.split import draw_split

    rows = _csv_rows(tmp_path, "image_path,target,patient", 3, 12,
                     lambda k, i: f"c{k},p{(k * 12 + i) // 3}")
    rows += ["0_0.png,c0,p0", "0_0.png,c0,p0", "1_1.png,c2,p4"]  # repeated; a second label
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        data = load_data(tmp_path / "t.csv", image_size=16)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "twice" in text and "more than one label" in text
    assert len(data.labels) == 37  # 36 + the second label of 1_1.png
    copies = [i for i, name in enumerate(data.ids) if name == "1_1.png"]
    assert len(copies) == 2 and data.groups[copies[0]] == data.groups[copies[1]]
    for seed in range(5):
        s = draw_split(data.labels, val_fraction=0.2, test_fraction=0.2, seed=seed,
                       groups=data.groups)
        part = {i: name for name in ("train", "val", "test") for i in getattr(s, name)}
        assert part[copies[0]] == part[copies[1]]


def test_group_column_keeps_each_group_in_one_split(make_csv, tmp_path):
    from trainables.split import draw_split

    rng = np.random.default_rng(1)
    rows = ["image_path,target,patient"]
    for k in range(2):
        for i in range(30):
            write_image(tmp_path / "g" / f"{k}_{i}.png", k, rng)
            rows.append(f"{k}_{i}.png,c{k},patient{(k * 30 + i) // 4}")
    (tmp_path / "g" / "t.csv").write_text("\n".join(rows) + "\n")
    data = load_data(tmp_path / "g" / "t.csv", image_size=16, group_col="patient")
    s = draw_split(data.labels, val_fraction=0.2, test_fraction=0.2, seed=0, groups=data.groups)
    parts = [set(data.groups[getattr(s, p)]) for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert all(len(p) for p in parts)
    with pytest.raises(UserError, match="group column 'ward'"):
        load_data(tmp_path / "g" / "t.csv", image_size=16, group_col="ward")


# ---------------------------------------------------------------- the probe's bad input


def test_a_huge_png_to_predict_is_refused_before_decoding(tmp_path, caplog):
    """Probe case 5: a 194 kB PNG of 1.6 gigapixels was decoded (10.2 GB); Pillow refuses only
    above twice its limit. It is named and skipped without being decoded."""
    folder = tmp_path / "predict"
    write_image(folder / "ok.png", 0, np.random.default_rng(0))
    _png_header_only(folder / "huge.png", 40000, 40000)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # and Pillow's raw DecompressionBombWarning stays out
        images, ids = read_unlabelled(folder, image_size=16)
    assert ids == ["ok.png"] and images.shape == (1, 16, 16, 3)
    line = next(r.getMessage() for r in caplog.records if "huge.png" in r.getMessage())
    assert "40000x40000 pixels" in line and "downscale it" in line


def test_csv_empty_cells_are_named_and_numeric_labels_stay_text(tmp_path, caplog):
    """Probe case 10: rows with an empty label or path were dropped silently, and one empty
    cell turned labels 0, 1 into classes '0.0', '1.0'."""
    rows = _csv_rows(tmp_path, "image_path,target", 2, 4, lambda k, i: f"{k}")
    rows += ["0_0.png,", ",1"]  # an empty label, an empty path
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        data = load_data(tmp_path / "train.csv", image_size=16)
    assert data.class_names == ["0", "1"] and len(data.labels) == 8
    line = next(r.getMessage() for r in caplog.records if "empty" in r.getMessage())
    assert "1 row(s) with an empty 'image_path' cell" in line
    assert "1 row(s) with an empty 'target' cell" in line and "line 10" in line


def test_a_class_folder_starting_with_a_dot_is_named(make_folder, caplog):
    """Probe case 12: a folder '..c' of 16 images was dropped silently."""
    root = make_folder(classes=2, per_class=3)
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(root / "..c" / f"{i}.png", 0, rng)
    with caplog.at_level(logging.WARNING):
        data = load_data(root, image_size=16)
    assert data.class_names == ["class_0", "class_1"]
    assert any("..c with 4 image(s)" in r.getMessage() and "rename it" in r.getMessage()
               for r in caplog.records)


def test_classes_missing_from_val_are_named_with_the_f1_cap(caplog):
    """Probe case 11: with --metric f1 and one class in val, val F1 is capped at 0.33, and
    nothing said so."""
    from search.experiment import warn_missing_classes
    from trainables.split import Split

    data = ImageData(np.zeros((9, 4, 4, 3), np.uint8), np.array([0, 1, 2] * 3),
                     ["a", "b", "c"], [str(i) for i in range(9)])
    split = Split(train=np.arange(6), val=np.array([6]), test=np.array([7, 8]))
    with caplog.at_level(logging.WARNING):
        warn_missing_classes(data, split, "f1")
    lines = [r.getMessage() for r in caplog.records]
    assert any(ln.startswith("the val part holds no image of 2 class(es) (b, c)") and
               "cannot exceed 0.33" in ln and "--val-fraction" in ln for ln in lines), lines
    assert any(ln.startswith("the test part holds no image of 1 class(es) (a)") and
               "F1" not in ln for ln in lines), lines
