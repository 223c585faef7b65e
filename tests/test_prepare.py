"""`vlprompt data prepare`: tiny copies of each official archive -> the loaders' layout, verified and loadable.

Every fake archive has the official internal layout (top folder, sub-folders, file names, the annotation and
list files in their real text formats) but only a few images. So that `verify` can pass honestly on a few
images, the datasets with a split file or list are given a *subset of the real file* (its first item of every
class in each of train/val/test, same JSON format), installed where the shipped file is read, with its git blob
id and the expected counts set to match; everything else `verify` checks is the real code path (hash check,
class count, split counts, every listed image present). Food101/SUN397 (whose split files we do not have) get
a small split in the real format; the ImageNet family gets one image per class with the counts set to match.
One test (DTD) runs on the real shipped split with every one of its 5,640 images, with nothing patched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from urllib.error import URLError

import pytest
from conftest_data import TINY_JPEG, aircraft_lines, imagenet_names, real_file, real_split
from PIL import Image

import vlprompt.data.prepare as prep
from vlprompt.cli import main
from vlprompt.data import ImageDataset, build_dataset, git_blob_sha1, registry, standard
from vlprompt.data.base import Counts
from vlprompt.data.prepare import RECIPES, MissingFiles, check, convert, files, instructions, prepare
from vlprompt.errors import DataError

WNIDS = [wnid for wnid, _ in imagenet_names()]
FAKE_IMAGENET: dict = {}  # what build_imagenet decided, for the checks


# --- building fake official archives ---------------------------------------------------------------------


def make_tar(path: Path, entries: dict[str, bytes], link_images: bool = False) -> Path:
    """A tar (gzip-compressed for .gz/.tgz names) holding ``entries``; with ``link_images`` every image after
    the first is a hard-link member, so that thousands of images cost a few bytes each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith(("gz", ".tgz")) else "w"
    first_image = None
    with tarfile.open(path, mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if link_images and data is TINY_JPEG and first_image is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first_image
                tar.addfile(info)
                continue
            if data is TINY_JPEG:
                first_image = first_image or name
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def tar_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def set_counts(monkeypatch, name: str, train: int, val: int, test: int, classes: int) -> None:
    info = registry.REGISTRY[name]
    monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(info, counts=Counts(train, val, test, classes)))


def install_packaged(monkeypatch, filename: str, content: bytes) -> None:
    """Serve ``content`` where the shipped ``filename`` is read, with its blob id (the loaders' real path)."""
    stored = filename + ".gz" if filename.startswith("split_") else filename
    original = standard.read_packaged
    monkeypatch.setattr(standard, "read_packaged", lambda f, _o=original: content if f == stored else _o(f))
    monkeypatch.setitem(standard.BLOBS, filename, git_blob_sha1(content))


def first_per_label(items: list) -> list:
    seen, out = set(), []
    for item in items:
        if item[1] not in seen:
            seen.add(item[1])
            out.append(item)
    return out


def small_split(monkeypatch, name: str, filename: str) -> dict:
    """The real split cut to its first item of every label in each subset, installed as the shipped file."""
    real = real_split(filename)
    small = {key: first_per_label(real[key]) for key in ("train", "val", "test")}
    install_packaged(monkeypatch, filename, json.dumps(small, indent=4).encode())
    classes = len({label for items in small.values() for _, label, _ in items})
    set_counts(monkeypatch, name, len(small["train"]), len(small["val"]), len(small["test"]), classes)
    return small


def user_split(monkeypatch, tmp: Path, name: str, filename: str, rels: list[tuple[str, str]]) -> tuple[dict, Path]:
    """A small split in CoOp's format for Food101/SUN397 (the real files are too large to ship), accepted by
    setting its blob id; written as the user would download it."""
    classes = sorted({c for _, c in rels})
    keys = ("train", "val", "test")
    split = {key: [[rel, classes.index(c), c] for rel, c in rels[i::3]] for i, key in enumerate(keys)}
    content = json.dumps(split, indent=4).encode()
    monkeypatch.setitem(standard.BLOBS, filename, git_blob_sha1(content))
    set_counts(monkeypatch, name, len(split["train"]), len(split["val"]), len(split["test"]), len(classes))
    path = tmp / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return split, path


def paths(split: dict) -> list[str]:
    return list(dict.fromkeys(rel for key in ("train", "val", "test") for rel, _, _ in split[key]))


def images(prefix: str, rels) -> dict[str, bytes]:
    return {f"{prefix}{rel}": TINY_JPEG for rel in rels}


# One builder per dataset: writes the official files into ``tmp`` and returns the --from paths.


def build_caltech(tmp, mp, zipped=True):
    rels = paths(small_split(mp, "caltech101", "split_zhou_Caltech101.json"))
    inner = images("101_ObjectCategories/", rels + ["BACKGROUND_Google/image_0001.jpg", "Faces_easy/image_0001.jpg"])
    if not zipped:
        return [make_tar(tmp / "101_ObjectCategories.tar.gz", inner)]
    make_tar(tmp / "inner.tar.gz", inner)
    return [make_zip(tmp / "caltech-101.zip", {
        "caltech-101/101_ObjectCategories.tar.gz": (tmp / "inner.tar.gz").read_bytes(),
        "caltech-101/Annotations.tar": tar_bytes({"Annotations/Faces_2/annotation_0001.mat": b"MATLAB 5.0"}),
        "caltech-101/show_annotation.m": b"function show_annotation(imgfile, annotation_file)\n",
    })]


def build_pets(tmp, mp):
    split = small_split(mp, "oxford_pets", "split_zhou_OxfordPets.json")
    stems = [(rel[: -len(".jpg")], label) for rel, label, _ in split["train"] + split["test"]]
    listing = "".join(f"{stem} {label + 1} {1 if stem[0].isupper() else 2} 1\n" for stem, label in stems)
    return [
        make_tar(tmp / "images.tar.gz", images("images/", paths(split))),
        make_tar(tmp / "annotations.tar.gz", {
            "annotations/list.txt": ("#Image CLASS-ID SPECIES BREED ID\n" + listing).encode(),
            "annotations/trainval.txt": listing.encode(),
            "annotations/test.txt": listing.encode(),
            "annotations/README": b"OXFORD-IIIT PET Dataset\n",
        }),
    ]


def build_cars(tmp, mp, kaggle=False):
    rels = paths(small_split(mp, "stanford_cars", "split_zhou_StanfordCars.json"))
    if kaggle:  # the Kaggle mirror: folders, each nested twice
        for rel in rels:
            folder, name = rel.split("/")
            (tmp / folder / folder).mkdir(parents=True, exist_ok=True)
            (tmp / folder / folder / name).write_bytes(TINY_JPEG)
        return [tmp / "cars_train", tmp / "cars_test"]
    return [
        make_tar(tmp / "cars_train.tgz", images("", [r for r in rels if r.startswith("cars_train/")])),
        make_tar(tmp / "cars_test.tgz", images("", [r for r in rels if r.startswith("cars_test/")])),
        make_tar(tmp / "car_devkit.tgz", {"devkit/README.txt": b"cars_meta.mat: class names\n"}),
    ]


def build_flowers(tmp, mp):
    rels = paths(small_split(mp, "oxford_flowers", "split_zhou_OxfordFlowers.json"))
    return [make_tar(tmp / "102flowers.tgz", images("jpg/", rels))]


def build_food(tmp, mp):
    rels = [(f"{c}/{100 + i}.jpg", c) for c in ("apple_pie", "baby_back_ribs", "baklava") for i in range(3)]
    split, split_file = user_split(mp, tmp, "food101", "split_zhou_Food101.json", rels)
    meta = "".join(f"{rel[:-4]}\n" for rel, _ in rels).encode()
    return [make_tar(tmp / "food-101.tar.gz", {
        **images("food-101/images/", paths(split)),
        "food-101/meta/classes.txt": b"apple_pie\nbaby_back_ribs\nbaklava\n",
        "food-101/meta/train.txt": meta, "food-101/meta/test.txt": meta,
        "food-101/README.txt": b"Food-101\n", "food-101/license_agreement.txt": b"...\n",
    }), split_file]


def build_aircraft(tmp, mp):
    lists = {}
    for split in ("train", "val", "test"):
        seen, lines = set(), []
        for image_id, variant in aircraft_lines(split):
            if variant not in seen:
                seen.add(variant)
                lines.append(f"{image_id} {variant}\n")
        lists[split] = "".join(lines).encode()
        install_packaged(mp, f"fgvc_aircraft_images_variant_{split}.txt", lists[split])
    set_counts(mp, "fgvc_aircraft", 100, 100, 100, 100)
    ids = [line.split(" ")[0] for split in lists for line in lists[split].decode().splitlines()]
    return [make_tar(tmp / "fgvc-aircraft-2013b.tar.gz", {
        **images("fgvc-aircraft-2013b/data/images/", [f"{i}.jpg" for i in ids]),
        "fgvc-aircraft-2013b/data/variants.txt": real_file("fgvc_aircraft_variants.txt"),
        **{f"fgvc-aircraft-2013b/data/images_variant_{s}.txt": lists[s] for s in lists},
        "fgvc-aircraft-2013b/README.md": b"FGVC-Aircraft 2013b\n",
    })]


def build_sun(tmp, mp):
    rels = [(f"a/abbey/sun_{i}aaa.jpg", "abbey") for i in range(3)]
    rels += [(f"b/bakery/shop/sun_{i}bbb.jpg", "shop bakery") for i in range(3)]
    split, split_file = user_split(mp, tmp, "sun397", "split_zhou_SUN397.json", rels)
    return [make_tar(tmp / "SUN397.tar.gz", {
        **images("SUN397/", paths(split)),
        "SUN397/ClassName.txt": b"/a/abbey\n/b/bakery/shop\n",
        "SUN397/README.txt": b"SUN397\n",
    }), split_file]


def build_dtd(tmp, mp):
    rels = paths(small_split(mp, "dtd", "split_zhou_DescribableTextures.json"))
    listing = "".join(f"{rel}\n" for rel in rels).encode()
    return [make_tar(tmp / "dtd-r1.0.1.tar.gz", {
        **images("dtd/images/", rels),
        **{f"dtd/labels/{s}1.txt": listing for s in ("train", "val", "test")},
        "dtd/labels/labels_joint_anno.txt": listing,
    })]


def build_eurosat(tmp, mp):
    rels = paths(small_split(mp, "eurosat", "split_zhou_EuroSAT.json"))
    return [make_zip(tmp / "EuroSAT.zip", images("2750/", rels))]


def build_eurosat_zenodo(tmp, mp):
    rels = paths(small_split(mp, "eurosat", "split_zhou_EuroSAT.json"))
    return [make_zip(tmp / "EuroSAT_RGB.zip", images("EuroSAT_RGB/", rels))]


def build_ucf(tmp, mp, videos=False):
    rels = paths(small_split(mp, "ucf101", "split_zhou_UCF101.json"))
    if not videos:
        return [make_zip(tmp / "UCF-101-midframes.zip", images("UCF-101-midframes/", rels))]
    for rel in rels:  # UCF101.rar extracted: UCF-101/<ClassCamelCase>/<video>.avi (HandstandPushups quirk kept)
        stem = os.path.basename(rel)[: -len(".jpg")]
        folder = stem[2:].rsplit("_", 2)[0].replace("HandStand", "Handstand")
        (tmp / "UCF-101" / folder).mkdir(parents=True, exist_ok=True)
        (tmp / "UCF-101" / folder / f"{stem}.avi").write_bytes(b"RIFF....AVI " + stem.encode())
    frames = {}

    def fake_reader():  # a decoder is optional; this one "decodes" frame n // 2 of a 9-frame video
        def read(path):
            frames[path] = 9 // 2
            return Image.new("RGB", (8, 6), (frames[path], 0, 0))
        return read

    mp.setattr(convert, "middle_frame_reader", fake_reader)
    return [tmp / "UCF-101"]


def build_imagenet(tmp, mp, folders=False):
    set_counts(mp, "imagenet", 1000, 1000, 1000, 1000)
    if folders:  # train/ and val/ already in wnid folders (as torchvision or valprep.sh leave them)
        for split in ("train", "val"):
            for wnid in WNIDS:
                (tmp / split / wnid).mkdir(parents=True)
                (tmp / split / wnid / f"{wnid}_1.JPEG").write_bytes(TINY_JPEG)
        return [tmp / "train", tmp / "val"]
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np

    class_id = {wnid: (k * 7) % 1000 + 1 for k, wnid in enumerate(WNIDS)}  # ILSVRC ids are not sorted-wnid order
    image_class = [WNIDS[(i * 3) % 1000] for i in range(1000)]  # val image i + 1 shows this class
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros(1001, dtype=[(f, object) for f in fields])
    for k, wnid in enumerate(WNIDS):
        synsets[k] = (class_id[wnid], wnid, "word", "gloss", 0, np.zeros(0), 0, 1300)
    synsets[1000] = (1001, "n00001740", "entity", "gloss", 2, np.array([1, 2]), 18, 0)
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{class_id[wnid]}\n" for wnid in image_class).encode()
    FAKE_IMAGENET["val_class"] = image_class
    return [
        make_tar(tmp / "ILSVRC2012_img_train.tar", {
            f"{wnid}.tar": tar_bytes({f"{wnid}_1.JPEG": TINY_JPEG}) for wnid in WNIDS
        }),
        make_tar(tmp / "ILSVRC2012_img_val.tar", {f"ILSVRC2012_val_{i + 1:08d}.JPEG": TINY_JPEG for i in range(1000)}),
        make_tar(tmp / "ILSVRC2012_devkit_t12.tar.gz", {
            "ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
            "ILSVRC2012_devkit_t12/readme.txt": b"ILSVRC2012 devkit\n",
        }),
    ]


def build_v2(tmp, mp):
    set_counts(mp, "imagenet_v2", 0, 0, 1000, 1000)
    top = "imagenetv2-matched-frequency-format-val"
    return [make_tar(tmp / "imagenetv2-matched-frequency.tar.gz",
                     images(f"{top}/", [f"{i}/7e3a1f{i}.jpeg" for i in range(1000)]))]


def build_sketch(tmp, mp):
    set_counts(mp, "imagenet_sketch", 0, 0, 1000, 1000)
    return [make_zip(tmp / "ImageNet-Sketch.zip", images("sketch/", [f"{w}/sketch_1.JPEG" for w in WNIDS]))]


def build_a_or_r(letter):
    def build(tmp, mp):
        wnids = real_file(f"imagenet_{letter}_synsets.txt").decode().split()
        set_counts(mp, f"imagenet_{letter}", 0, 0, 200, 200)
        top = f"imagenet-{letter}"
        return [make_tar(tmp / f"{top}.tar", {**images(f"{top}/", [f"{w}/0.0001_x.jpg" for w in wnids]),
                                              f"{top}/README.txt": b"class list\n"})]
    return build


# case id -> (dataset, builder)
CASES = {
    "imagenet": ("imagenet", build_imagenet),
    "imagenet-folders": ("imagenet", lambda t, m: build_imagenet(t, m, folders=True)),
    "caltech101": ("caltech101", build_caltech),
    "caltech101-inner-tar": ("caltech101", lambda t, m: build_caltech(t, m, zipped=False)),
    "oxford_pets": ("oxford_pets", build_pets),
    "stanford_cars": ("stanford_cars", build_cars),
    "stanford_cars-kaggle": ("stanford_cars", lambda t, m: build_cars(t, m, kaggle=True)),
    "oxford_flowers": ("oxford_flowers", build_flowers),
    "food101": ("food101", build_food),
    "fgvc_aircraft": ("fgvc_aircraft", build_aircraft),
    "sun397": ("sun397", build_sun),
    "dtd": ("dtd", build_dtd),
    "eurosat": ("eurosat", build_eurosat),
    "eurosat-zenodo": ("eurosat", build_eurosat_zenodo),
    "ucf101": ("ucf101", build_ucf),
    "ucf101-videos": ("ucf101", lambda t, m: build_ucf(t, m, videos=True)),
    "imagenet_v2": ("imagenet_v2", build_v2),
    "imagenet_sketch": ("imagenet_sketch", build_sketch),
    "imagenet_a": ("imagenet_a", build_a_or_r("a")),
    "imagenet_r": ("imagenet_r", build_a_or_r("r")),
}


def prepare_args(name: str, root: Path, sources) -> list[str]:
    args = ["data", "prepare", "--dataset", name, "--root", str(root)]
    return args + [arg for source in sources for arg in ("--from", str(source))]


def tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


# --- every dataset: prepare, verify, load, re-run ----------------------------------------------------------


def test_recipes_cover_the_standard_datasets():
    assert list(RECIPES) == [info.name for info in standard.STANDARD_DATASETS]
    for name, recipe in RECIPES.items():
        assert recipe.folder == registry.dataset_info(name).layouts[0].folder
        text = instructions(name, "/data")
        for download in recipe.downloads:
            assert download.filename in text
        assert "vlprompt data prepare --dataset" in text and "/data/downloads" in text
    assert CASES.keys() >= set(RECIPES)


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_verifies_and_loads(case, tmp_path, monkeypatch, capsys):
    name, build = CASES[case]
    sources = build(tmp_path / "from", monkeypatch)
    root = tmp_path / "data"
    assert main(prepare_args(name, root, sources)) == 0
    out = capsys.readouterr().out
    assert f"{name}: prepared in {root / RECIPES[name].folder}" in out
    assert "MISMATCH" not in out and "images are missing" not in out and out.strip().endswith("OK")
    assert sorted(os.listdir(root)) == [RECIPES[name].folder]  # no temporary folder left behind

    splits = build_dataset(name, root)
    assert splits.test and all(d.path.startswith(str(root / RECIPES[name].folder)) for d in splits.test)
    image, _ = ImageDataset(splits.test[:1])[0]
    assert isinstance(image, Image.Image)
    marker = json.loads((root / RECIPES[name].folder / prep.MARKER).read_text())
    assert marker["dataset"] == name and marker["inputs"]

    if case == "imagenet":  # val images went to the class the devkit gives them
        val = root / "imagenet" / "images" / "val"
        assert (val / FAKE_IMAGENET["val_class"][41] / "ILSVRC2012_val_00000042.JPEG").is_file()
    if case == "ucf101-videos":
        handstand = [d for d in splits.test if d.classname == "Handstand_Pushups"]
        assert handstand and Image.open(handstand[0].path).getpixel((0, 0))[0] in (3, 4, 5)  # frame 9 // 2 = 4

    before = tree(root)
    assert main(prepare_args(name, root, sources)) == 0  # idempotent: nothing is touched
    assert f"{name}: already prepared" in capsys.readouterr().out
    assert tree(root) == before


def test_full_dtd_with_the_real_split_and_nothing_patched(tmp_path, capsys):
    split = real_split("split_zhou_DescribableTextures.json")
    archive = make_tar(tmp_path / "dtd-r1.0.1.tar.gz", images("dtd/images/", paths(split)), link_images=True)
    root = tmp_path / "data"
    assert main(prepare_args("dtd", root, [archive])) == 0
    out = capsys.readouterr().out
    assert "train      2820 images (expected 2820) ok" in out and "all 5640 images present" in out
    assert out.strip().endswith("OK") and check("dtd", root) == []


def test_renamed_archive_is_recognised_by_its_content(tmp_path, monkeypatch):
    (source,) = build_eurosat(tmp_path, monkeypatch)
    renamed = source.rename(tmp_path / "eurosat-rgb-download.zip")
    assert prepare("eurosat", tmp_path / "data", [renamed]).action == "prepared"


def test_torchvision_copy_is_already_present_and_split_can_be_added(tmp_path, monkeypatch):
    (archive, split_file) = build_food(tmp_path / "from", monkeypatch)
    root = tmp_path / "data"
    with tarfile.open(archive) as tar:  # what torchvision's Food101(download=True) leaves: no CoOp split
        tar.extractall(root, filter="data")
    result = prepare("food101", root, [split_file])
    assert result.action == "split file added" and (root / "food-101" / "split_zhou_Food101.json").is_file()
    assert prepare("food101", root).action == "already present"


# --- interruption and safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["eurosat", "oxford_pets"])
def test_interrupted_extraction_then_rerun(case, tmp_path, monkeypatch, capsys):
    name, build = CASES[case]
    sources = build(tmp_path / "from", monkeypatch)
    root = tmp_path / "data"
    real_extract, calls = files._extract_member, []

    def interrupted(archive, member, dest):
        calls.append(member)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of an archive
        real_extract(archive, member, dest)

    monkeypatch.setattr(files, "_extract_member", interrupted)
    assert main(prepare_args(name, root, sources)) == 130
    assert "re-run the same command" in capsys.readouterr().err
    staging = root / f".vlprompt-prepare-{RECIPES[name].folder}"
    assert not (root / RECIPES[name].folder).exists()  # the dataset folder never exists half-made
    assert (staging / prep.STAGING_SENTINEL).is_file() and len(calls) == 5
    assert check(name, root)  # and the loaders do not see a dataset

    monkeypatch.setattr(files, "_extract_member", real_extract)
    assert main(prepare_args(name, root, sources)) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert not staging.exists() and check(name, root) == []


def test_leftover_temporary_folder_after_the_rename_is_cleaned(tmp_path, monkeypatch):
    sources = build_eurosat(tmp_path / "from", monkeypatch)
    root = tmp_path / "data"
    prepare("eurosat", root, sources)
    staging = root / ".vlprompt-prepare-eurosat"  # as if killed between the rename and the clean-up
    (staging / "work").mkdir(parents=True)
    (staging / prep.STAGING_SENTINEL).write_text("temporary")
    assert prepare("eurosat", root, sources).action == "already prepared" and not staging.exists()


def test_never_deletes_or_overwrites_user_files(tmp_path, monkeypatch):
    sources = build_eurosat(tmp_path / "from", monkeypatch)
    root = tmp_path / "data"
    notes = root / "eurosat" / "my_notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(DataError, match="never overwrites or deletes your files: move it away"):
        prepare("eurosat", root, sources)
    assert notes.read_text() == "mine" and sorted(os.listdir(root / "eurosat")) == ["my_notes.txt"]
    notes.unlink()  # an empty folder (CoOp's instructions say to create it first) is fine
    assert prepare("eurosat", root, sources).action == "prepared"

    foreign = tmp_path / "other" / ".vlprompt-prepare-dtd"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="was not made by vlprompt data prepare"):
        prepare("dtd", tmp_path / "other", build_dtd(tmp_path / "dtd", monkeypatch))
    assert (foreign / "keep.txt").read_text() == "mine"


def test_user_folder_is_linked_not_moved(tmp_path, monkeypatch):
    (folder,) = build_ucf(tmp_path / "from", monkeypatch, videos=True)
    before = tree(folder)
    prepare("ucf101", tmp_path / "data", [folder])
    assert tree(folder) == before


# --- clear errors --------------------------------------------------------------------------------------------


def test_unknown_file_names_the_file_and_the_expected_ones(tmp_path, capsys):
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    assert main(prepare_args("dtd", tmp_path / "data", [stray])) == 2
    err = capsys.readouterr().err
    assert f"{stray} is not a file of dtd: expected one of dtd-r1.0.1.tar.gz" in err and "Traceback" not in err
    assert main(prepare_args("dtd", tmp_path / "data", [tmp_path / "nope.tar.gz"])) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_truncated_archive(tmp_path, monkeypatch):
    (archive,) = build_pets(tmp_path, monkeypatch)[:1]
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images.tar.gz cannot be extracted .*download it again \(expected md5 "
                                        r"5c4f3ee8e5d25df40f4fd59a7f44e54c"):
        prepare("oxford_pets", tmp_path / "data", [archive])
    assert not (tmp_path / "data" / "oxford_pets").exists()


def test_archive_with_another_layout(tmp_path):
    archive = make_tar(tmp_path / "dtd-r1.0.1.tar.gz", {"textures/images/banded/banded_0001.jpg": TINY_JPEG})
    with pytest.raises(DataError, match=r"does not hold the folder dtd/ .*found: textures"):
        prepare("dtd", tmp_path / "data", [archive])


def test_user_split_checked_before_extraction(tmp_path, monkeypatch):
    archive, split_file = build_food(tmp_path, monkeypatch)
    with pytest.raises(MissingFiles, match="split_zhou_Food101.json") as error:
        prepare("food101", tmp_path / "data", [archive])
    assert standard.BLOBS["split_zhou_Food101.json"] in error.value.instructions
    split_file.write_bytes(split_file.read_bytes() + b"\n")
    with pytest.raises(DataError, match="is not the official file"):
        prepare("food101", tmp_path / "data", [archive, split_file])
    assert not (tmp_path / "data").exists()


def test_flat_imagenet_val_needs_the_devkit(tmp_path, monkeypatch):
    set_counts(monkeypatch, "imagenet", 1000, 1000, 1000, 1000)
    val = make_tar(tmp_path / "ILSVRC2012_img_val.tar", {"ILSVRC2012_val_00000001.JPEG": TINY_JPEG})
    (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(DataError, match="needs ILSVRC2012_devkit_t12.tar.gz"):
        prepare("imagenet", tmp_path / "data", [tmp_path / "train", val])


def test_ucf101_rar_and_missing_video_decoder(tmp_path, monkeypatch):
    rar = tmp_path / "UCF101.rar"
    rar.write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(DataError, match="RAR archive, which Python cannot read: extract it first"):
        prepare("ucf101", tmp_path / "data", [rar])
    for module in ("torchcodec", "torchcodec.decoders", "av", "cv2"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(DataError, match="needs a video decoder.*pip install av.*UCF-101-midframes.zip"):
        convert.middle_frame_reader()


def test_middle_frame_with_pyav(tmp_path):
    """The real decoder path (PyAV is optional; skipped where it is not installed)."""
    av = pytest.importorskip("av")
    import numpy as np

    video = str(tmp_path / "v_ApplyEyeMakeup_g01_c01.avi")
    with av.open(video, "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(9):  # frame i is grey level 25 * i
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 25 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    image = convert.middle_frame_reader()(video)
    assert image.size == (64, 48) and abs(image.getpixel((10, 10))[1] - 100) <= 6  # frame 9 // 2 = 4


# --- downloads -----------------------------------------------------------------------------------------------


def test_no_sources_prints_the_instructions(tmp_path, capsys):
    assert main(["data", "prepare", "--dataset", "sun397", "--root", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "sun397 is not prepared" in out and "SUN397.tar.gz" in out and "split_zhou_SUN397.json" in out
    assert f"{tmp_path / 'data' / 'downloads'}" in out and "8d5725db8f70bcf02245665304f863e68f96a24c" in out
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("failure", [URLError("[Errno -2] Name or service not known"), "hang"])
def test_download_without_network_fails_fast(failure, tmp_path, monkeypatch, capsys):
    def no_network(request, timeout):
        if failure == "hang":
            time.sleep(60)  # a resolver that never answers: the deadline must still hold
        raise failure

    monkeypatch.setattr(files, "urlopen", no_network)
    start = time.monotonic()
    with pytest.raises(MissingFiles, match="could not download dtd-r1.0.1.tar.gz") as error:
        prepare("dtd", tmp_path / "data", download=True, timeout=0.2)
    assert time.monotonic() - start < 5
    assert "Put the files into" in str(error.value) and RECIPES["dtd"].downloads[0].url in str(error.value)
    assert main(prepare_args("dtd", tmp_path / "data", []) + ["--download", "--timeout", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "Fetch it by hand" in err and "dtd-r1.0.1.tar.gz" in err and "Traceback" not in err
    assert not list((tmp_path / "data" / "downloads").iterdir())  # no partial file left


def test_download_real_host_fails_fast_here(tmp_path):
    """One real attempt (no mock): on this machine there is no route to the dataset hosts."""
    start = time.monotonic()
    try:
        prepare("eurosat", tmp_path / "data", download=True, timeout=2)
    except MissingFiles as error:
        assert "could not download EuroSAT.zip" in str(error) and "Fetch it by hand" in str(error)
    else:  # a machine with network fetched and prepared the real file
        return
    assert time.monotonic() - start < 10


def test_manual_only_files_fail_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "urlopen", lambda *a, **k: pytest.fail("nothing may be fetched"))
    with pytest.raises(MissingFiles, match="split_zhou_Food101.json cannot be downloaded by a program"):
        prepare("food101", tmp_path / "data", download=True)
    with pytest.raises(MissingFiles, match="cars_train.tgz, cars_test.tgz cannot be downloaded"):
        prepare("stanford_cars", tmp_path / "data", download=True)


def test_download_checks_md5_and_is_kept(tmp_path, monkeypatch):
    (archive,) = build_eurosat(tmp_path / "host", monkeypatch)
    recipe = RECIPES["eurosat"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()

    def serve(md5_sum):
        download = dataclasses.replace(recipe.downloads[0], url=archive.as_uri(), md5=md5_sum)
        monkeypatch.setitem(RECIPES, "eurosat", dataclasses.replace(recipe, downloads=(download,)))

    root = tmp_path / "data"
    serve("0" * 32)
    with pytest.raises(DataError, match=f"has md5 {md5}, expected 0{{32}}"):
        prepare("eurosat", root, download=True)
    assert os.listdir(root / "downloads") == []  # the bad file is not kept
    serve(md5)
    assert prepare("eurosat", root, download=True).action == "prepared"
    assert (root / "downloads" / "EuroSAT.zip").is_file() and check("eurosat", root) == []
    os.rename(root / "eurosat", tmp_path / "moved")  # the kept download is used again without --download
    assert prepare("eurosat", root).action == "prepared"


def test_urls_and_md5_are_torchvision_s():
    datasets = pytest.importorskip("torchvision.datasets")
    from torchvision.datasets import imagenet as tv_imagenet

    def ours(name, filename):
        return RECIPES[name].download(filename)

    pairs = [
        (ours("dtd", "dtd-r1.0.1.tar.gz"), getattr(datasets.DTD, "_URL", None), getattr(datasets.DTD, "_MD5", None)),
        (ours("food101", "food-101.tar.gz"), getattr(datasets.Food101, "_URL", None),
         getattr(datasets.Food101, "_MD5", None)),
        (ours("sun397", "SUN397.tar.gz"), getattr(datasets.SUN397, "_DATASET_URL", None),
         getattr(datasets.SUN397, "_DATASET_MD5", None)),
        (ours("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz"), getattr(datasets.FGVCAircraft, "_URL", None), None),
    ]
    for url, md5 in getattr(datasets.OxfordIIITPet, "_RESOURCES", ()):
        pairs.append((ours("oxford_pets", url.rsplit("/", 1)[1]), url, md5))
    flowers = getattr(datasets.Flowers102, "_file_dict", {})
    if "image" in flowers:
        pairs.append((ours("oxford_flowers", "102flowers.tgz"),
                      datasets.Flowers102._download_url_prefix + flowers["image"][0], flowers["image"][1]))
    for key, (filename, md5) in getattr(tv_imagenet, "ARCHIVE_META", {}).items():
        pairs.append((ours("imagenet", filename), None, md5))
    for download, url, md5 in pairs:
        if url is not None:
            assert download.url == url
        if md5 is not None:
            assert download.md5 == md5
    assert len(pairs) >= 8
