"""The 15 standard datasets, read from fake trees laid out at the exact paths of the real split files."""

from __future__ import annotations

import json
import os

import pytest
from conftest_data import (
    REAL_SPLITS,
    SPLIT_DATASETS,
    aircraft_lines,
    imagenet_names,
    make_aircraft_tree,
    make_class_folders,
    make_split_tree,
    real_file,
    real_split,
    write_files,
)

from vlprompt.data import available_datasets, build_dataset, dataset_info, git_blob_sha1
from vlprompt.data import standard
from vlprompt.data.templates import template_for
from vlprompt.errors import ConfigError, DataError

# train / val / test / classes, as SOURCES.md of the real split fixtures lists them (= CoOp's table).
EXPECTED = {
    "oxford_pets": (2944, 736, 3669, 37),
    "caltech101": (4128, 1649, 2465, 100),
    "stanford_cars": (6509, 1635, 8041, 196),
    "oxford_flowers": (4093, 1633, 2463, 102),
    "dtd": (2820, 1128, 1692, 47),
    "eurosat": (13500, 5400, 8100, 10),
    "ucf101": (7639, 1898, 3783, 101),
    "fgvc_aircraft": (3334, 3333, 3333, 100),
}
EUROSAT = [
    "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
    "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One data root with every dataset whose split we hold (about 96k tiny files)."""
    root = tmp_path_factory.mktemp("data")
    for name in SPLIT_DATASETS:
        make_split_tree(root, name)
    make_aircraft_tree(root)
    return root


def test_registry_names():
    assert available_datasets() == [
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
        "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
        "custom_folder", "custom_csv", "split_json",
        "toy_objects", "toy_shapes", "toy_colors", "toy_textures", "toy_patterns", "toy_layouts", "toy_signs",
        "toy_color_textures_dusk", "toy_objects_sketch", "toy_objects_pixel", "toy_objects_inverted",
        "toy_objects_painted", "toy_objects_dusk",
    ]
    with pytest.raises(ConfigError, match="unknown dataset 'pets'.*oxford_pets"):
        build_dataset("pets", "/tmp")


@pytest.mark.parametrize("filename", sorted(standard.BLOBS))
def test_shipped_files_are_the_real_files(filename):
    if filename in ("split_zhou_Food101.json", "split_zhou_SUN397.json"):
        pytest.skip("not shipped: the user supplies it")
    shipped = standard.packaged(filename)  # itself checks the blob id
    assert git_blob_sha1(shipped) == standard.BLOBS[filename]
    if REAL_SPLITS.exists():
        assert shipped == real_file(filename)


def test_blob_ids_match_sources_md():
    if not (REAL_SPLITS / "SOURCES.md").exists():
        pytest.skip("shared fixtures not available")
    sources = (REAL_SPLITS / "SOURCES.md").read_text()
    for blob in standard.BLOBS.values():
        assert blob in sources


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_classes_labels(root, name):
    splits = build_dataset(name, root)
    train, val, test, classes = EXPECTED[name]
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (train, val, test, classes)
    assert splits.template == template_for(name)
    info = dataset_info(name)
    assert (info.counts.train, info.counts.val, info.counts.test, info.counts.classes) == EXPECTED[name]
    for items in (splits.train, splits.val, splits.test):
        assert {d.label for d in items} == set(range(classes))  # every class in every split
        assert all(os.path.isabs(d.path) and d.classname == splits.classnames[d.label] for d in items)
    if name in SPLIT_DATASETS:
        filename, image_dir = SPLIT_DATASETS[name]
        real = real_split(filename)
        for key in ("train", "val", "test"):  # same items, same order, same labels and names as the file
            expected = [(os.path.join(root, image_dir, rel), label, cname) for rel, label, cname in real[key]]
            assert [(d.path, d.label, d.classname) for d in splits.split(key)] == expected


def test_class_name_fixes(root):
    caltech = build_dataset("caltech101", root, check_files=False)
    for fixed in ("airplane", "face", "leopard", "motorbike"):
        assert fixed in caltech.classnames
    assert not {"airplanes", "Faces", "Leopards", "Motorbikes", "BACKGROUND_Google", "Faces_easy"} & set(
        caltech.classnames
    )
    assert caltech.train[0].path.endswith("Faces/image_0274.jpg") and caltech.train[0].classname == "face"
    assert build_dataset("eurosat", root, check_files=False).classnames == EUROSAT
    flowers = build_dataset("oxford_flowers", root, check_files=False)
    cat_to_name = json.loads(real_file("oxford_flowers_cat_to_name.json"))
    assert flowers.classnames == [cat_to_name[str(i + 1)] for i in range(102)]
    assert (flowers.train[0].label, flowers.train[0].classname) == (76, "passion flower")
    ucf = build_dataset("ucf101", root, check_files=False)
    assert ucf.classnames[0] == "Apply_Eye_Makeup"  # underscores kept; format_prompt replaces them
    cars = build_dataset("stanford_cars", root, check_files=False)
    assert cars.train[0].path == str(root / "stanford_cars" / "cars_train" / "05266.jpg")


def test_aircraft_labels_follow_variants(root):
    splits = build_dataset("fgvc_aircraft", root)
    variants = real_file("fgvc_aircraft_variants.txt").decode().splitlines()
    assert splits.classnames == variants and "Boeing 717" in variants
    for split in ("train", "val", "test"):
        lines = aircraft_lines(split)
        items = splits.split(split)
        assert [os.path.basename(d.path) for d in items] == [f"{i}.jpg" for i, _ in lines]
        assert [d.label for d in items] == [variants.index(v) for _, v in lines]


@pytest.mark.parametrize(
    "name, folder",
    [
        ("oxford_pets", "oxford-iiit-pet/images"),
        ("caltech101", "caltech101/101_ObjectCategories"),
        ("oxford_flowers", "flowers-102/jpg"),
        ("dtd", "dtd/dtd/images"),
        ("fgvc_aircraft", "fgvc-aircraft-2013b/data/images"),
    ],
)
def test_torchvision_layouts(root, tmp_path, name, folder):
    coop_folder = SPLIT_DATASETS[name][1] if name in SPLIT_DATASETS else "fgvc_aircraft/images"
    (tmp_path / folder).parent.mkdir(parents=True)
    os.symlink(root / coop_folder, tmp_path / folder)
    coop, torchvision_layout = build_dataset(name, root), build_dataset(name, tmp_path)
    assert [(d.label, os.path.relpath(d.path, root / coop_folder)) for d in coop.test] == [
        (d.label, os.path.relpath(d.path, tmp_path / folder)) for d in torchvision_layout.test
    ]


def test_missing_root_and_dataset_folder(tmp_path):
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nope'} does not exist.*docs/datasets.md"):
        build_dataset("oxford_pets", tmp_path / "nope")
    with pytest.raises(DataError) as error:
        build_dataset("oxford_pets", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "oxford_pets" / "images") in message and "oxford-iiit-pet" in message
    assert "robots.ox.ac.uk" in message and "docs/datasets.md" in message


def test_missing_images_listed(root, tmp_path):
    os.symlink(root / "dtd", tmp_path / "dtd_real")
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    real = real_split("split_zhou_DescribableTextures.json")
    keep = [rel for key in ("train", "val", "test") for rel, _, _ in real[key]][7:]
    write_files(str(tmp_path / "dtd" / "images" / rel) for rel in keep)
    with pytest.raises(DataError) as error:
        build_dataset("dtd", tmp_path)
    message = str(error.value)
    assert "7 of 5640 images" in message and real["train"][0][0] in message and "check_files=False" in message
    assert len(build_dataset("dtd", tmp_path, check_files=False).train) == 2820


@pytest.mark.parametrize("name, folder, filename", [
    ("food101", "food-101", "split_zhou_Food101.json"),
    ("sun397", "sun397", "split_zhou_SUN397.json"),
])
def test_user_supplied_split_verified(tmp_path, monkeypatch, name, folder, filename):
    images = tmp_path / folder / ("images" if name == "food101" else "SUN397")
    images.mkdir(parents=True)
    with pytest.raises(DataError) as error:  # missing: never regenerated
        build_dataset(name, tmp_path)
    assert filename in str(error.value) and standard.BLOBS[filename] in str(error.value)
    assert "never regenerates" in str(error.value)

    fake = {"train": [["a/x1.jpg", 0, "a"], ["b/y1.jpg", 1, "b"]], "val": [["a/x2.jpg", 0, "a"]],
            "test": [["b/y2.jpg", 1, "b"]]}
    content = json.dumps(fake, indent=4).encode()
    (tmp_path / folder / filename).write_bytes(content)
    with pytest.raises(DataError, match=f"not the official file: its git blob id is {git_blob_sha1(content)}"):
        build_dataset(name, tmp_path)

    # Same code path with the file accepted (as the real file would be, by its blob id).
    monkeypatch.setitem(standard.BLOBS, filename, git_blob_sha1(content))
    write_files(str(images / rel) for key in fake for rel, _, _ in fake[key])
    splits = build_dataset(name, tmp_path)
    assert splits.classnames == ["a", "b"] and splits.test[0].path == str(images / "b" / "y2.jpg")
    assert splits.template == template_for(name)


def test_sun397_torchvision_layout(tmp_path, monkeypatch):
    fake = {"train": [["a/abbey/x.jpg", 0, "abbey"]], "val": [], "test": []}
    content = json.dumps(fake).encode()
    monkeypatch.setitem(standard.BLOBS, "split_zhou_SUN397.json", git_blob_sha1(content))
    write_files([str(tmp_path / "SUN397" / "a" / "abbey" / "x.jpg")])
    (tmp_path / "SUN397" / "split_zhou_SUN397.json").write_bytes(content)
    assert build_dataset("sun397", tmp_path).train[0].path == str(tmp_path / "SUN397/a/abbey/x.jpg")


def test_altered_shipped_split_is_rejected(monkeypatch):
    original = standard.read_packaged
    monkeypatch.setattr(standard, "read_packaged", lambda f: original(f).replace(b"Abyssinian", b"Abyssinien"))
    with pytest.raises(DataError, match="packaged split_zhou_OxfordPets.json is not the official file.*reinstall"):
        standard.packaged("split_zhou_OxfordPets.json")


# --- ImageNet family -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    wnids = [wnid for wnid, _ in imagenet_names()]
    make_class_folders(root / "imagenet" / "images" / "train", wnids, per_class=2)
    make_class_folders(root / "imagenet" / "images" / "val", wnids)
    make_class_folders(root / "imagenet-sketch" / "images", wnids)
    make_class_folders(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val", range(1000))
    for name, folder in (("a", "imagenet-adversarial/imagenet-a"), ("r", "imagenet-rendition/imagenet-r")):
        subset = real_file(f"imagenet_{name}_synsets.txt").decode().split()
        make_class_folders(root / folder, subset)
        (root / folder / "README.txt").write_text("not a class")
    return root


def test_imagenet(imagenet_root):
    splits = build_dataset("imagenet", imagenet_root)
    pairs = imagenet_names()
    assert splits.classnames == [name for _, name in pairs] and splits.num_classes == 1000
    assert splits.classnames.count("missile") == 2 and splits.classnames.count("sunglasses") == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2000, 1000, 1000)
    assert [(d.path, d.label) for d in splits.val] == [(d.path, d.label) for d in splits.test]
    assert splits.sample_val is False
    assert splits.classnames[1] == "goldfish"
    first = splits.train[0]
    assert first.path == str(imagenet_root / "imagenet/images/train/n01440764/img_0.jpg") and first.label == 0
    # missile appears twice, each with its own label
    missiles = [i for i, (wnid, _) in enumerate(pairs) if wnid in ("n03773504", "n04008634")]
    assert [splits.classnames[i] for i in missiles] == ["missile", "missile"]


def test_imagenet_torchvision_layout(tmp_path):
    wnids = [wnid for wnid, _ in imagenet_names()]
    make_class_folders(tmp_path / "imagenet" / "train", wnids)
    make_class_folders(tmp_path / "imagenet" / "val", wnids)
    assert len(build_dataset("imagenet", tmp_path).test) == 1000


def test_imagenet_val_not_sorted_into_folders(tmp_path):
    wnids = [wnid for wnid, _ in imagenet_names()]
    make_class_folders(tmp_path / "imagenet" / "images" / "train", wnids)
    write_files([str(tmp_path / "imagenet" / "images" / "val" / "ILSVRC2012_val_00000001.JPEG")])
    with pytest.raises(DataError, match="1000 class folders are missing.*sorted into wnid folders"):
        build_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("name, subset", [("imagenet_a", "imagenet_a_synsets.txt"),
                                          ("imagenet_r", "imagenet_r_synsets.txt")])
def test_imagenet_a_r_200_classes(imagenet_root, name, subset):
    splits = build_dataset(name, imagenet_root)
    wnids = sorted(real_file(subset).decode().split())
    names = dict(imagenet_names())
    assert splits.num_classes == 200 and len(splits.test) == 200
    assert splits.classnames == [names[w] for w in wnids]
    assert [os.path.basename(os.path.dirname(d.path)) for d in splits.test] == wnids  # label = sorted index
    assert [d.label for d in splits.test] == list(range(200))
    assert splits.train == [] and splits.val == [] and splits.sample_val is False
    assert splits.template == template_for(name)


def test_imagenet_sketch_and_v2(imagenet_root):
    pairs = imagenet_names()
    sketch = build_dataset("imagenet_sketch", imagenet_root)
    v2 = build_dataset("imagenet_v2", imagenet_root)
    for splits in (sketch, v2):
        assert splits.classnames == [name for _, name in pairs] and len(splits.test) == 1000
        assert [d.label for d in splits.test] == list(range(1000))
    assert v2.test[5].path == str(imagenet_root / "imagenetv2/imagenetv2-matched-frequency-format-val/5/img_0.jpg")


def test_imagenet_variant_folder_errors(tmp_path):
    subset = real_file("imagenet_a_synsets.txt").decode().split()
    make_class_folders(tmp_path / "imagenet-adversarial" / "imagenet-a", subset[1:] + ["n99999999"])
    with pytest.raises(DataError) as error:
        build_dataset("imagenet_a", tmp_path)
    message = str(error.value)
    assert f"1 class folders are missing (first: {subset[0]})" in message and "n99999999" in message
    make_class_folders(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val", range(999))
    with pytest.raises(DataError, match="1 class folders.*missing.*999"):
        build_dataset("imagenet_v2", tmp_path)
