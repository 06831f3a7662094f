"""The decoded cache for data larger than memory: the same bytes as the in-memory path, read
row by row, decoded once, reused; the choice of path; the same run streamed or in memory."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from trainables.cache import CACHE_DIR, SMALL_BYTES, Decoding, decode_to_cache, streamed
from trainables.config import TrainConfig
from trainables.data import (
    class_files,
    decode_image,
    decode_images,
    load_data,
    load_image_data,
    save_image_data,
)
from trainables.errors import UserError
from trainables.inputs import TrialInputs
from trainables.models import initial_state
from trainables.split import draw_split
from trainables.train import fit

SIDE = 32


def _files(make_folder, tmp_path):
    root = make_folder(classes=3, per_class=8)
    (root / "class_1" / "broken.jpg").write_bytes(b"not an image")
    return [f for _, f in class_files(root)]


def test_the_cache_holds_the_decoder_s_bytes_and_reads_any_rows(make_folder, tmp_path):
    files = _files(make_folder, tmp_path)
    memory, kept = decode_images(files, SIDE)
    disk, kept_disk = decode_to_cache(files, SIDE, "skip", tmp_path / "cache", decode_image)
    assert kept_disk == kept and len(kept) == len(files) - 1  # the broken file is left out
    assert disk.shape == memory.shape and disk.nbytes == memory.nbytes and streamed(disk)
    assert np.array_equal(np.asarray(disk), memory)
    idx = np.array([5, 3, 4, 20, 21, 22, 0])  # runs and jumps, out of order
    assert np.array_equal(disk[idx], memory[idx])
    assert np.array_equal(disk[7], memory[7]) and np.array_equal(disk[2:9], memory[2:9])
    assert np.array_equal(disk[np.arange(len(disk)) % 2 == 0], memory[::2])
    out = np.empty((len(idx), SIDE, SIDE, 3), np.uint8)
    assert np.take(disk, idx, axis=0, out=out) is out and np.array_equal(out, memory[idx])
    with pytest.raises(IndexError):
        disk[np.array([len(disk)])]
    again = pickle.loads(pickle.dumps(disk))  # what Ray and loader workers receive
    assert len(pickle.dumps(disk)) < 4096 and np.array_equal(again[idx], memory[idx])


def test_a_cache_is_decoded_once_and_found_again(make_folder, tmp_path, caplog):
    files = _files(make_folder, tmp_path)
    decode_to_cache(files, SIDE, "skip", tmp_path / "cache", decode_image)
    (made,) = (tmp_path / "cache").iterdir()
    stamp = (made / "images.npy").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        decode_to_cache(files, SIDE, "skip", tmp_path / "cache", decode_image)
    assert "decoded before" in caplog.text and "px into" not in caplog.text
    assert (made / "images.npy").stat().st_mtime_ns == stamp
    assert "skipping unreadable image" in caplog.text  # still said on every use
    decode_to_cache(files, 24, "skip", tmp_path / "cache", decode_image)  # a cache of its own
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(UserError, match="broken.jpg.*--on-bad-image skip"):
        decode_to_cache(files, SIDE, "error", tmp_path / "cache", decode_image)


def test_small_data_stays_in_memory_and_a_forced_path_is_taken(tmp_path):
    asked = []
    auto = Decoding("auto", tmp_path, start_cluster=lambda: asked.append(1))
    assert not auto.stream(SMALL_BYTES // (SIDE * SIDE * 3), SIDE) and not asked  # no Ray
    assert Decoding("stream", tmp_path).stream(10, SIDE)
    assert not Decoding("memory", tmp_path).stream(10**9, 512)
    with pytest.raises(UserError, match="--data-path"):
        Decoding("disk", tmp_path).stream(10, SIDE)


def test_streamed_data_saves_as_its_cache_s_name(make_folder, tmp_path):
    data = load_data(make_folder(classes=3, per_class=8), image_size=SIDE,
                     decoding=Decoding("stream", tmp_path))
    assert streamed(data.images) and data.facts()["data_path"] == "stream"
    assert (tmp_path / CACHE_DIR).is_dir()
    save_image_data(data, tmp_path / "data.npz")
    back = load_image_data(tmp_path / "data.npz")
    assert streamed(back.images) and np.array_equal(np.asarray(back.images),
                                                    np.asarray(data.images))
    assert (tmp_path / "data.npz").stat().st_size < data.images.nbytes
    for cached in (tmp_path / CACHE_DIR).iterdir():  # the cache removed: one sentence
        (cached / "images.npy").unlink()
    with pytest.raises(UserError, match="without --resume"):
        load_image_data(tmp_path / "data.npz")


def test_a_run_is_the_same_streamed_or_in_memory(make_folder, tmp_path):
    folder = make_folder(classes=3, per_class=12)
    in_memory = load_data(folder, image_size=SIDE)
    on_disk = load_data(folder, image_size=SIDE, decoding=Decoding("stream", tmp_path))
    split = draw_split(in_memory.labels, val_fraction=0.2, test_fraction=0.1, seed=0,
                       class_names=in_memory.class_names)
    init = initial_state("resnet10t", 3, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=4, threads=1, amp="off", augment="strong",
                      hflip=True, keep_last=0)
    runs = []
    for data, workers in ((in_memory, 0), (on_disk, 0), (on_disk, 2)):
        reports: list[dict] = []
        fit(dataclasses.replace(cfg, loader_workers=workers), TrialInputs(
            data=data, init_state=init, train_idx=split.train, val_idx=split.val), None,
            report=reports.append)
        runs.append([(r["train_loss"], r["val_loss"], r["val_acc"]) for r in reports])
    assert runs[0] == runs[1] == runs[2]
