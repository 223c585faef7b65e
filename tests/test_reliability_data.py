"""Data that would give a wrong number without a word: classes short of the requested shots, hostile archives in
``vlprompt data prepare``, split files whose paths leave the image folder."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import warnings
import zipfile

import pytest
from conftest_data import TINY_JPEG, colour_patch_tree
from test_prepare import images, make_zip, paths, small_split

from vlprompt.cli import main
from vlprompt.data import Datum, DatasetSplits, build_dataset, sample_few_shot
from vlprompt.data.fewshot import FewShotWarning, fewshot_indices, short_classes
from vlprompt.data.prepare import ExtractLimits, prepare
from vlprompt.data.prepare.files import extract, parse_bytes
from vlprompt.engine import build_config
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.errors import DataError
from vlprompt.experiments.protocols import run_experiment

# --- shots larger than a class ---------------------------------------------------------------------------


def toy_splits(per_class: dict[str, int]) -> DatasetSplits:
    names = list(per_class)
    train = [Datum(f"/x/{name}/{i}.jpg", label, name) for label, name in enumerate(names)
             for i in range(per_class[name])]
    return DatasetSplits("toy", train, train[:2], train[:2], names, "a photo of a {}.", sample_val=False)


def test_short_classes_warn_with_their_counts_and_the_draw_stays_dassl_s(tmp_path):
    splits = toy_splits({"cat": 20, "dog": 3, "owl": 16, "emu": 0})
    with pytest.warns(FewShotWarning) as caught:
        subset = sample_few_shot(splits, 16, seed=2, cache_dir=tmp_path)
    message = str(caught[0].message)
    assert "toy: 2 of 4 classes have fewer than 16 training images" in message
    assert "dog 3" in message and "emu 0" in message and "cat" not in message and "owl" not in message
    assert short_classes(subset, 16) == {"dog": 3, "emu": 0}

    random.seed(2)  # the draw itself is unchanged: Dassl's, all items of a short class
    expected = [splits.train[i] for i in fewshot_indices([d.label for d in splits.train], 16)]
    assert subset.train == expected and sum(d.classname == "dog" for d in subset.train) == 3

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every class has k images, nor for k < 1
        sample_few_shot(splits, 0, seed=2, use_cache=False)
        sample_few_shot(toy_splits({"cat": 5, "dog": 4}), 4, seed=2, use_cache=False)


def test_data_sample_reports_short_classes_in_one_line_and_in_its_json(tmp_path, capsys):
    out = tmp_path / "sample.json"
    assert main(["data", "sample", "--dataset", "toy_shapes", "--root", str(tmp_path / "data"), "--shots", "20",
                 "--seed", "1", "--out", str(out)]) == 0
    sample = json.loads(out.read_text())
    assert sample["short_classes"] == {name: 16 for name in ("circle", "square", "triangle", "star", "cross", "heart")}
    err = capsys.readouterr().err
    assert err.startswith("warning: toy_shapes: 6 of 6 classes have fewer than 20 training images") and \
        "Warning:" not in err


def test_shared_class_names_are_told_apart():
    splits = DatasetSplits("x", [Datum("/a", 0, "missile")], [], [], ["missile", "missile"], "{}")
    assert short_classes(splits, 1) == {"missile (label 1)": 0}


def test_run_with_more_shots_than_images_records_the_counts_used(tmp_path):
    root = colour_patch_tree(tmp_path / "data", {"blue": (30, 30, 220), "red": (220, 30, 30)}, train=3, test=1)
    (root / "train" / "red" / "2.png").unlink()
    overrides = ["backbone.name=tiny", "backbone.pretrained=null", "device=cpu", "progress=false",
                 f"data.root={root}", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output={tmp_path / 'runs'}", "optim.epochs=1", "data.batch_size=2"]
    config = build_config(method="coop", protocol="few_shot", dataset="custom_folder", shots=100, seed=1,
                          overrides=overrides)
    results = run_experiment(config)
    assert results["shots"] == 100 and results["short_classes"] == {"blue": 3, "red": 2}
    folder = RunFolder(run_dir(config))
    with open(folder.results_file, encoding="utf-8") as file:
        assert json.load(file)["short_classes"] == {"blue": 3, "red": 2}
    with open(folder.log_file, encoding="utf-8") as file:
        assert "2 of 2 classes have fewer than 100 training images and train on all they have (blue 3, red 2)" \
            in file.read()


# --- archives in `vlprompt data prepare` -------------------------------------------------------------------


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def zeros_zip(path, name: str, size: int, extra: dict[str, bytes] | None = None):
    """A zip holding ``size`` zero bytes as ``name`` (deflated about 1000:1), written in 1 MB pieces."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in (extra or {}).items():
            archive.writestr(member, data)
        with archive.open(name, "w", force_zip64=True) as member:
            for _ in range(size // 2**20):
                member.write(bytes(2**20))
    return path


@pytest.mark.parametrize("member", ["2750/../x.jpg", "../x.jpg", "/etc/x.jpg", "2750\\..\\..\\x.jpg"])
def test_zip_member_leaving_the_folder_is_refused_like_a_tar_one(tmp_path, member):
    archive = make_zip(tmp_path / "EuroSAT.zip", {"2750/Forest/Forest_1.jpg": TINY_JPEG, member: TINY_JPEG})
    with pytest.raises(DataError, match=r"EuroSAT.zip holds a member that would be written outside the data "
                                        r"root \(.*x.jpg'\); this is not the official archive"):
        extract(str(archive), str(tmp_path / "out"), print)
    assert files_under(tmp_path / "out") == []  # refused before anything is written

    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w") as handle:
        info = tarfile.TarInfo(member)
        info.size = len(TINY_JPEG)
        handle.addfile(info, io.BytesIO(TINY_JPEG))
    with pytest.raises(DataError, match="holds a member that would be written outside the data root"):
        extract(str(tar), str(tmp_path / "out_tar"), print)


def test_prepare_refuses_the_zip_in_one_line(tmp_path, monkeypatch, capsys):
    rels = paths(small_split(monkeypatch, "eurosat", "split_zhou_EuroSAT.json"))
    archive = make_zip(tmp_path / "EuroSAT.zip", {**images("2750/", rels), "2750/../evil.jpg": TINY_JPEG})
    assert main(["data", "prepare", "--dataset", "eurosat", "--root", str(tmp_path / "data"),
                 "--from", str(archive)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "would be written outside the data root ('2750/../evil.jpg')" in err
    assert not (tmp_path / "data" / "eurosat").exists()


def test_archive_bombs_are_refused_before_writing_and_the_limits_can_be_raised(tmp_path):
    archive = zeros_zip(tmp_path / "bomb.zip", "big.bin", 8 * 2**20)
    small = ExtractLimits(max_ratio=20, allowance=10**6)
    with pytest.raises(DataError, match=r"bomb.zip unpacks to more than 1.\d+ MB \(20 times its size of .* kB, "
                                        r"plus 1 MB; --max-extract-ratio raises it\); refusing it"):
        extract(str(archive), str(tmp_path / "out"), print, limits=small)
    assert files_under(tmp_path / "out") == []
    with pytest.raises(DataError, match=r"unpacks to more than 2 MB \(the extraction size limit; "
                                        r"--max-extract-size raises it\)"):
        extract(str(archive), str(tmp_path / "out"), print, limits=ExtractLimits(max_bytes=2 * 10**6))
    assert extract(str(archive), str(tmp_path / "out"), print, limits=ExtractLimits(max_ratio=5000)) == 1
    assert os.path.getsize(tmp_path / "out" / "big.bin") == 8 * 2**20

    tar = tmp_path / "bomb.tar.gz"  # a tar stream: counted member by member as it is read
    with tarfile.open(tar, "w:gz") as handle:
        for i in range(3):
            info = tarfile.TarInfo(f"part{i}.bin")
            info.size = 2**20
            handle.addfile(info, io.BytesIO(bytes(2**20)))
    with pytest.raises(DataError, match="bomb.tar.gz unpacks to more than"):
        extract(str(tar), str(tmp_path / "out_tar"), print, limits=ExtractLimits(allowance=2 * 2**20))
    assert files_under(tmp_path / "out_tar") == ["part0.bin", "part1.bin"]  # nothing past the limit

    assert parse_bytes("300GB") == 300 * 10**9 and parse_bytes("1.5 TB") == 1.5e12 and parse_bytes("2GiB") == 2**31
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")


def test_prepare_default_limit_refuses_a_bomb_and_the_flag_raises_it(tmp_path, monkeypatch, capsys):
    rels = paths(small_split(monkeypatch, "eurosat", "split_zhou_EuroSAT.json"))
    archive = zeros_zip(tmp_path / "EuroSAT.zip", "2750/padding.bin", 40 * 2**20, images("2750/", rels))
    assert archive.stat().st_size < 2**20  # 40 MB of zeros in well under 1 MB
    args = ["data", "prepare", "--dataset", "eurosat", "--root", str(tmp_path / "data"), "--from", str(archive)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unpacks to more than" in err and "--max-extract-ratio raises it" in err
    assert main(args + ["--max-extract-ratio", "1000"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    with pytest.raises(SystemExit):  # argparse: usage and one error line
        main(args + ["--max-extract-size", "a lot"])
    assert "expected a size such as 500MB" in capsys.readouterr().err


@pytest.mark.parametrize("target_exists", [True, False])
def test_dataset_folder_that_is_a_symlink_is_prepared_where_it_points(tmp_path, monkeypatch, capsys,
                                                                      target_exists):
    rels = paths(small_split(monkeypatch, "eurosat", "split_zhou_EuroSAT.json"))
    archive = make_zip(tmp_path / "EuroSAT.zip", images("2750/", rels))
    root, big = tmp_path / "data", tmp_path / "big"
    where = big / "eurosat_files"
    (where if target_exists else big).mkdir(parents=True)  # an empty folder, or none yet
    root.mkdir()
    (root / "eurosat").symlink_to(where)
    assert main(["data", "prepare", "--dataset", "eurosat", "--root", str(root), "--from", str(archive)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert (where / "2750").is_dir() and (root / "eurosat").is_symlink()
    assert build_dataset("eurosat", str(root)).test
    assert os.listdir(big) == ["eurosat_files"]  # no temporary folder left beside it

    (root / "eurosat").unlink()
    (root / "eurosat").symlink_to(archive)  # a link to a file: one clear error
    with pytest.raises(DataError, match=r"eurosat is a symbolic link to .*EuroSAT.zip, which is not a folder"):
        prepare("eurosat", str(root), [str(archive)])


# --- split files whose paths leave the image folder --------------------------------------------------------


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.jpg", "a/../../outside.jpg", ""])
def test_split_paths_must_stay_inside_the_image_folder(tmp_path, bad, capsys):
    images_dir = tmp_path / "images"
    (images_dir / "a").mkdir(parents=True)
    (images_dir / "a" / "1.jpg").write_bytes(TINY_JPEG)
    (tmp_path / "outside.jpg").write_bytes(TINY_JPEG)
    split = {"train": [["a/1.jpg", 0, "a"]], "val": [["a/1.jpg", 0, "a"]], "test": [["a/1.jpg", 0, "a"], [bad, 0, "a"]]}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    with pytest.raises(DataError, match=rf"image path {bad!r} is absolute or leaves the image folder"):
        build_dataset("split_json", str(images_dir), split_file=str(split_file))
    assert main(["data", "verify", "--dataset", "split_json", "--root", str(images_dir),
                 "--option", f"split_file={split_file}"]) == 2
    assert "is absolute or leaves the image folder" in capsys.readouterr().err

    csv_file = images_dir / "labels.csv"
    csv_file.write_text(f"a/1.jpg,0,train\na/1.jpg,0,test\n{bad or '.'},0,test\n")
    with pytest.raises(DataError, match="is absolute or leaves the image folder"):
        build_dataset("custom_csv", str(csv_file))
