"""Custom datasets: a class-folder tree, a CSV, and a CoOp-format split JSON, through the same registry."""

from __future__ import annotations

import json
import os

import pytest
from conftest_data import image_bytes, make_class_folders, write_files

from vlprompt.data import build_dataset, git_blob_sha1, sample_few_shot, subsample_classes
from vlprompt.data.templates import DEFAULT_TEMPLATE
from vlprompt.errors import ConfigError, DataError

PNG = image_bytes("PNG")


def test_folder_automatic_split(tmp_path):
    make_class_folders(tmp_path, ["cat", "dog", "axolotl"], per_class=10)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    splits = build_dataset("custom_folder", tmp_path)
    assert splits.classnames == ["axolotl", "cat", "dog"]  # labels follow sorted folder names
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 6, 9)  # 5/2/3 per class
    for items in (splits.train, splits.val, splits.test):
        assert all(splits.classnames[d.label] == os.path.basename(os.path.dirname(d.path)) for d in items)
    paths = [d.path for d in splits.train + splits.val + splits.test]
    assert len(set(paths)) == 30 and not any(p.endswith(".txt") for p in paths)
    assert splits.template == DEFAULT_TEMPLATE
    assert build_dataset("custom_folder", tmp_path) == splits  # deterministic
    assert build_dataset("custom_folder", tmp_path, split_seed=1).train != splits.train
    other = build_dataset("custom_folder", tmp_path, split_fractions=[0.6, 0.1])
    assert (len(other.train), len(other.val), len(other.test)) == (18, 3, 9)


def test_folder_small_classes(tmp_path):
    make_class_folders(tmp_path, ["a"], per_class=3)
    make_class_folders(tmp_path, ["b"], per_class=4)
    splits = build_dataset("custom_folder", tmp_path)
    assert [sum(d.label == c for d in splits.train) for c in (0, 1)] == [1, 2]
    assert len(splits.test) == 2  # 3 -> 1/1/1, 4 -> 2/1/1
    make_class_folders(tmp_path, ["c"], per_class=2)
    with pytest.raises(DataError, match="class 'c' has 2 images.*at least 3"):
        build_dataset("custom_folder", tmp_path)


def test_folder_classnames_and_template(tmp_path):
    make_class_folders(tmp_path, ["n01", "n02"], per_class=3)
    (tmp_path / "classnames.txt").write_text("n01 great white shark\n\nn02\n")
    splits = build_dataset("custom_folder", tmp_path, template="a photo of a {}, a fish.")
    assert splits.classnames == ["great white shark", "n02"]
    assert splits.train[0].classname in splits.classnames and splits.template == "a photo of a {}, a fish."
    (tmp_path / "names.txt").write_text("n03 nothing\n")
    with pytest.raises(DataError, match="names class folder 'n03'"):
        build_dataset("custom_folder", tmp_path, classnames_file=str(tmp_path / "names.txt"))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("custom_folder", tmp_path, classnames_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="exactly one"):
        build_dataset("custom_folder", tmp_path, template="no placeholder")


def test_folder_with_split_folders(tmp_path):
    make_class_folders(tmp_path / "train", ["a", "b"], per_class=3)
    make_class_folders(tmp_path / "test", ["a", "b"], per_class=2)
    splits = build_dataset("custom_folder", tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 4, 4)
    assert splits.val == splits.test  # no val/: val = test, as for ImageNet
    make_class_folders(tmp_path / "val", ["b"], per_class=1)
    splits = build_dataset("custom_folder", tmp_path)
    assert [(d.label, d.classname) for d in splits.val] == [(1, "b")]
    make_class_folders(tmp_path / "test", ["zebra"])
    with pytest.raises(DataError, match="zebra is not a class"):
        build_dataset("custom_folder", tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("custom_folder", tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("custom_folder", tmp_path)
    make_class_folders(tmp_path, ["a"], per_class=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'empty_class'} has no images"):
        build_dataset("custom_folder", tmp_path)
    (tmp_path / "empty_class").rmdir()
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no test/ folder"):
        build_dataset("custom_folder", tmp_path)
    with pytest.raises(ConfigError, match="no option 'shots'.*allowed: classnames_file"):
        build_dataset("custom_folder", tmp_path, shots=4)


def test_csv_with_split_column(tmp_path):
    write_files([str(tmp_path / "img" / f"{i}.png") for i in range(6)], PNG)
    (tmp_path / "data.csv").write_text(
        "path,label,split\nimg/0.png,0,train\nimg/1.png,1,train\nimg/2.png,0,val\n"
        "img/3.png,1,test\nimg/4.png,0,test\nimg/5.png,1,TRAIN\n"
    )
    (tmp_path / "names.txt").write_text("red fox\nbarn owl\n")
    splits = build_dataset("custom_csv", tmp_path / "data.csv", classnames_file=str(tmp_path / "names.txt"))
    assert splits.classnames == ["red fox", "barn owl"]
    assert [(os.path.basename(d.path), d.label, d.classname) for d in splits.train] == [
        ("0.png", 0, "red fox"), ("1.png", 1, "barn owl"), ("5.png", 1, "barn owl")]
    assert [d.path for d in splits.val] == [str(tmp_path / "img" / "2.png")]
    assert len(splits.test) == 2
    base = subsample_classes(sample_few_shot(splits, 1, 1, use_cache=False), "base")  # a protocol just works
    assert base.classnames == ["red fox"] and all(d.label == 0 for d in base.test)


def test_csv_name_labels_and_automatic_split(tmp_path):
    rows = [f"{c}/{i}.jpg,{c}" for c in ("owl", "fox") for i in range(5)]
    write_files(str(tmp_path / row.split(",")[0]) for row in rows)
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = build_dataset("custom_csv", tmp_path / "data.csv")
    assert splits.classnames == ["fox", "owl"]
    assert len(splits.train) == 4 and len(splits.val) == 2 and len(splits.test) == 4  # round(2.5)=2, 1, 2


def test_csv_errors(tmp_path):
    csv = tmp_path / "data.csv"
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("custom_csv", csv)
    csv.write_text("a.jpg,0,train\nb.jpg,1,test\n")
    with pytest.raises(DataError, match=r"2 of 2 images listed in the split are missing.*a\.jpg"):
        build_dataset("custom_csv", csv)
    assert len(build_dataset("custom_csv", csv, check_files=False).train) == 1
    csv.write_text("a.jpg,0,training\n")
    with pytest.raises(DataError, match="'training'.*train, val or test"):
        build_dataset("custom_csv", csv, check_files=False)
    csv.write_text("a.jpg,0\nb.jpg,1,test\n")
    with pytest.raises(DataError, match="path,label or path,label,split"):
        build_dataset("custom_csv", csv, check_files=False)
    (tmp_path / "names.txt").write_text("only one\n")
    csv.write_text("a.jpg,0,train\nb.jpg,1,test\n")
    with pytest.raises(DataError, match=r"labels \[1\] are outside 0..0"):
        build_dataset("custom_csv", csv, classnames_file=str(tmp_path / "names.txt"), check_files=False)


def test_split_json(tmp_path):
    split = {"train": [["a/1.jpg", 0, "apple"], ["b/1.jpg", 1, "banana_split"]],
             "val": [["a/2.jpg", 0, "apple"]], "test": [["b/2.jpg", 1, "banana_split"]]}
    content = json.dumps(split).encode()
    (tmp_path / "split.json").write_bytes(content)
    images = tmp_path / "images"
    write_files(str(images / rel) for key in split for rel, _, _ in split[key])
    splits = build_dataset("split_json", images, split_file=str(tmp_path / "split.json"),
                           git_blob=git_blob_sha1(content))
    assert splits.classnames == ["apple", "banana_split"] and splits.test[0].path == str(images / "b" / "2.jpg")
    with pytest.raises(DataError, match="expected 0000"):
        build_dataset("split_json", images, split_file=str(tmp_path / "split.json"), git_blob="0000")
    with pytest.raises(ConfigError, match="split_file"):
        build_dataset("split_json", images)
    os.remove(images / "a" / "2.jpg")
    with pytest.raises(DataError, match="1 of 4 images"):
        build_dataset("split_json", images, split_file=str(tmp_path / "split.json"))
    (tmp_path / "bad.json").write_text('{"train": [["x.jpg", 0, "a"]], "val": [], "test": [["y.jpg", 0, "b"]]}')
    with pytest.raises(DataError, match="label 0 is named both 'a' and 'b'"):
        build_dataset("split_json", images, split_file=str(tmp_path / "bad.json"), check_files=False)
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(DataError, match='lists "train", "val" and "test"'):
        build_dataset("split_json", images, split_file=str(tmp_path / "bad.json"))
