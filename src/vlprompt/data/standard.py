"""The 15 standard datasets of the CoOp protocol (11 for few-shot / base-to-new / cross-dataset, 4 ImageNet
variants for cross-domain), read exactly as CoOp's ``datasets/*.py`` read them.

Every split comes from a fixed file: CoOp's ``split_zhou_*.json`` (shipped in ``splits/`` except Food101 and
SUN397, which the user supplies and we verify by git blob id), the official FGVC-Aircraft lists (shipped), or,
for the ImageNet family, the class folders on disk with labels fixed by the shipped wnid lists. A missing or
altered split file is an error; nothing is ever regenerated.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from vlprompt.data.base import (
    DOCS_HINT,
    Counts,
    DatasetInfo,
    DatasetSplits,
    Datum,
    Layout,
    check_files_exist,
    classnames_from_items,
    items_from_split,
    list_images,
    list_subfolders,
    parse_split_json,
    read_packaged,
    read_verified,
    to_datums,
)
from vlprompt.data.templates import template_for
from vlprompt.errors import DataError

REINSTALL = "The copy inside the vlprompt package was altered; reinstall vlprompt."

# --- class-name fixes (CoOp) -------------------------------------------------------------------------------
# The official split files already carry the fixed names; applying the fixes again is a no-op that keeps the
# rule in one visible place (and holds for any verified copy of the file).

# Caltech101: folders BACKGROUND_Google and Faces_easy are not classes (absent from the split: 100 classes).
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# git blob ids (``git hash-object``) of every split / class-list file, shipped or user-supplied.
BLOBS = {
    "split_zhou_Caltech101.json": "8be694a80de04a39fb159c462bea9696aa47ccf1",
    "split_zhou_DescribableTextures.json": "8dd197a94b598fa44ee3c9e35c486dd017ab00a7",
    "split_zhou_EuroSAT.json": "6bdc847a5d5c49dcc78e8cb8707b87198cbfa5a4",
    "split_zhou_OxfordFlowers.json": "8d10037b0690b6c65e307a354b039efb0f42404c",
    "split_zhou_OxfordPets.json": "fa821d9f9e7d32fdf3640bf74fa7491ed04f37da",
    "split_zhou_StanfordCars.json": "dcdb8264712e9940e74cfb0f06ddb8f9cc239b81",
    "split_zhou_UCF101.json": "ea87e3de7b4f6f00fdd77618e34a23508b4c5590",
    "split_zhou_Food101.json": "39557040ee6501bd32aa8b5dfd75f7941a32f0a7",
    "split_zhou_SUN397.json": "8d5725db8f70bcf02245665304f863e68f96a24c",
    "oxford_flowers_cat_to_name.json": "6c12bd26e1ab450b70e6e5e76aa1885591ec038e",
    "imagenet_classnames.txt": "91710b143a9ea19996f66d1b92af859f99e96e8e",
    "imagenet_a_synsets.txt": "6eeaaf66f3f471b7f622a608607a0c4e8409df33",
    "imagenet_r_synsets.txt": "33723baf489f210b1b79a8e9e033311fc016630b",
    "fgvc_aircraft_images_variant_train.txt": "2fba86dc13cbd46981c0d01678d8618327f1bb84",
    "fgvc_aircraft_images_variant_val.txt": "994f9e32cd9a3af6512a39d13c9c14df8ddb1e64",
    "fgvc_aircraft_images_variant_test.txt": "68e640792a8a1fc66ef29854a69580eeade7d699",
    "fgvc_aircraft_variants.txt": "7bedd0c5840d106f34ee55833a31db80a9773e9b",
}

# Where users get the two split files we cannot ship (CoOp's DATASETS.md links, and git mirrors).
USER_SPLIT_SOURCES = {
    "split_zhou_Food101.json": "https://drive.google.com/file/d/1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl/view",
    "split_zhou_SUN397.json": "https://drive.google.com/file/d/1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq/view",
}
MIRRORS = "or the splits/ folder of github.com/linzhiqiu/cross_modal_adaptation"


def packaged(filename: str) -> bytes:
    """A shipped split/class-list file, checked against its git blob id."""
    stored = filename + ".gz" if filename.endswith(".json") and filename.startswith("split_") else filename
    return read_verified(read_packaged(stored), BLOBS[filename], f"packaged {filename}", REINSTALL)


def imagenet_classnames() -> dict[str, str]:
    """CoOp's ``classnames.txt``: wnid -> CLIP class name, in the standard (sorted wnid) order."""
    names: dict[str, str] = {}
    for line in packaged("imagenet_classnames.txt").decode("utf-8").splitlines():
        wnid, *words = line.strip().split(" ")
        names[wnid] = " ".join(words)
    return names


# --- locating a dataset under the data root ---------------------------------------------------------------


def locate(info: DatasetInfo, root: str) -> tuple[str, str]:
    """(dataset folder, image folder) of the first layout of ``info`` present under ``root``."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(
            f"data root {root} does not exist; create it and put the datasets in it "
            f"(layouts: {DOCS_HINT})"
        )
    for layout in info.layouts:
        folder = os.path.join(root, layout.folder)
        images = os.path.join(folder, layout.images)
        if os.path.isdir(images):
            return folder, images.rstrip(os.sep)
    tried = " or ".join(
        f"{os.path.join(root, lay.folder, lay.images).rstrip(os.sep)} ({lay.origin} layout)" for lay in info.layouts
    )
    raise DataError(
        f"{info.name}: image folder not found; expected {tried}. Download: {info.download} "
        f"({DOCS_HINT}, section {info.name})"
    )


# --- builders ----------------------------------------------------------------------------------------------


def build_from_split_file(
    info: DatasetInfo,
    root: str,
    *,
    split_file: str,
    shipped: bool,
    fix_names: Callable[[list[str]], list[str]] | None = None,
    check_files: bool = True,
) -> DatasetSplits:
    """A dataset defined by a CoOp ``split_zhou_*.json`` (shipped, or user-supplied in the dataset folder)."""
    folder, image_dir = locate(info, root)
    if shipped:
        content, what = packaged(split_file), f"packaged {split_file}"
    else:
        path = os.path.join(folder, split_file)
        if not os.path.isfile(path):
            raise DataError(
                f"{info.name}: split file {path} is missing. Download {split_file} from "
                f"{USER_SPLIT_SOURCES[split_file]} {MIRRORS} and put it there (git blob {BLOBS[split_file]}); "
                f"vlprompt never regenerates a split, so results stay comparable ({DOCS_HINT})"
            )
        with open(path, "rb") as file:
            content = file.read()
        what = path
        read_verified(
            content, BLOBS[split_file], what,
            f"Replace it with the official CoOp file from {USER_SPLIT_SOURCES[split_file]} {MIRRORS}.",
        )
    split = parse_split_json(content, what)
    train, val, test = (items_from_split(split[key], image_dir, what) for key in ("train", "val", "test"))
    classnames = classnames_from_items(train, val, test, what=what)
    if fix_names is not None:
        classnames = fix_names(classnames)
    splits = DatasetSplits(
        name=info.name,
        train=to_datums(train, classnames),
        val=to_datums(val, classnames),
        test=to_datums(test, classnames),
        classnames=classnames,
        template=template_for(info.name),
    )
    if check_files:
        check_files_exist(info.name, (splits.train, splits.val, splits.test))
    return splits


def build_fgvc_aircraft(info: DatasetInfo, root: str, *, check_files: bool = True) -> DatasetSplits:
    """FGVC-Aircraft from the official variant lists (shipped); labels = line order of ``variants.txt``."""
    _, image_dir = locate(info, root)
    classnames = [line.strip() for line in packaged("fgvc_aircraft_variants.txt").decode().splitlines()]
    label_of = {name: label for label, name in enumerate(classnames)}

    def read(split: str) -> list[Datum]:
        items = []
        for line in packaged(f"fgvc_aircraft_images_variant_{split}.txt").decode().splitlines():
            image_id, *words = line.strip().split(" ")
            name = " ".join(words)
            items.append(Datum(os.path.join(image_dir, image_id + ".jpg"), label_of[name], name))
        return items

    splits = DatasetSplits(
        info.name, read("train"), read("val"), read("test"), classnames, template_for(info.name)
    )
    if check_files:
        check_files_exist(info.name, (splits.train, splits.val, splits.test))
    return splits


def read_wnid_folders(name: str, folder: str, wnids: list[str], names: dict[str, str]) -> list[Datum]:
    """Images of ``folder/<wnid>/*`` with label = index in ``wnids`` (sorted, as CoOp sorts the folders).

    Every expected wnid folder must exist and no other folder may (either would shift CoOp's labels). File
    names are sorted within a class; CoOp keeps the file system's order, which no one can reproduce.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{name}: {folder} is missing; it must hold one folder per class wnid ({DOCS_HINT})")
    present = set(list_subfolders(folder))
    missing = [w for w in wnids if w not in present]
    unexpected = sorted(present - set(wnids))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} class folders are missing (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} folders are not classes of {name} (first: {', '.join(unexpected[:5])})")
        raise DataError(
            f"{name}: {folder} must hold one folder per class wnid: {'; '.join(parts)} "
            f"(ImageNet's val images too must be sorted into wnid folders; {DOCS_HINT})"
        )
    items = []
    for label, wnid in enumerate(wnids):
        class_dir = os.path.join(folder, wnid)
        items.extend(Datum(os.path.join(class_dir, f), label, names[wnid]) for f in list_images(class_dir))
    return items


def build_imagenet(info: DatasetInfo, root: str, *, check_files: bool = True) -> DatasetSplits:
    """ImageNet: train = train folders, test = val = the official val set (CoOp evaluates on val).

    ``check_files`` is accepted for a uniform interface; the images are listed from disk, so they exist.
    """
    _, image_dir = locate(info, root)
    names = imagenet_classnames()
    wnids = list(names)
    train, test = (read_wnid_folders(info.name, os.path.join(image_dir, s), wnids, names) for s in ("train", "val"))
    return DatasetSplits(
        info.name, train, list(test), test, [names[w] for w in wnids], template_for(info.name), sample_val=False
    )


def build_imagenet_variant(
    info: DatasetInfo, root: str, *, subset: str | None = None, check_files: bool = True
) -> DatasetSplits:
    """A test-only ImageNet variant read from ``<wnid>`` folders (``subset``: shipped 200-wnid list, A/R).

    Files that are not folders (ImageNet-A/R ship a README.txt) are ignored, as CoOp ignores them.
    """
    _, image_dir = locate(info, root)
    names = imagenet_classnames()
    wnids = sorted(packaged(subset).decode().split()) if subset else list(names)
    test = read_wnid_folders(info.name, image_dir, wnids, names)
    return DatasetSplits(
        info.name, [], [], test, [names[w] for w in wnids], template_for(info.name), sample_val=False
    )


def build_imagenet_v2(info: DatasetInfo, root: str, *, check_files: bool = True) -> DatasetSplits:
    """ImageNetV2 matched-frequency: folder ``i`` holds class ``i`` (the i-th line of ImageNet classnames)."""
    _, image_dir = locate(info, root)
    names = list(imagenet_classnames().values())
    missing = [str(i) for i in range(len(names)) if not os.path.isdir(os.path.join(image_dir, str(i)))]
    if missing:
        raise DataError(
            f"{info.name}: {len(missing)} class folders of {image_dir} are missing (first: "
            f"{', '.join(missing[:5])}); expected folders 0..999 ({DOCS_HINT})"
        )
    test = []
    for label, name in enumerate(names):
        class_dir = os.path.join(image_dir, str(label))
        test.extend(Datum(os.path.join(class_dir, f), label, name) for f in list_images(class_dir))
    return DatasetSplits(info.name, [], [], test, names, template_for(info.name), sample_val=False)


# --- the registry entries ----------------------------------------------------------------------------------


def _flower_names(classnames: list[str]) -> list[str]:
    cat_to_name = json.loads(packaged("oxford_flowers_cat_to_name.json"))
    return [cat_to_name[str(label + 1)] for label in range(len(classnames))]


def _renamed(mapping: dict[str, str]) -> Callable[[list[str]], list[str]]:
    return lambda classnames: [mapping.get(name, name) for name in classnames]


def _entry(name, title, layouts, counts, split_source, download, builder, **builder_options) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        title=title,
        builder=builder,
        builder_options=builder_options,
        layouts=tuple(Layout(*layout) for layout in layouts),
        counts=Counts(*counts),
        split_source=split_source,
        download=download,
    )


def _split_entry(name, title, layouts, counts, split_file, download, shipped=True, fix_names=None):
    source = f"{split_file} ({'shipped' if shipped else 'user-supplied, verified by git blob id'})"
    return _entry(
        name, title, layouts, counts, source, download, build_from_split_file,
        split_file=split_file, shipped=shipped, fix_names=fix_names,
    )


STANDARD_DATASETS: tuple[DatasetInfo, ...] = (
    _entry(
        "imagenet", "ImageNet", [("imagenet", "images", "CoOp"), ("imagenet", "", "torchvision")],
        (1281167, 50000, 50000, 1000),
        "train/val class folders; test = val = official val; names from shipped classnames.txt",
        "https://image-net.org/download (ILSVRC2012 train and val)", build_imagenet,
    ),
    _split_entry(
        "caltech101", "Caltech101",
        [("caltech-101", "101_ObjectCategories", "CoOp"), ("caltech101", "101_ObjectCategories", "torchvision")],
        (4128, 1649, 2465, 100), "split_zhou_Caltech101.json",
        "https://data.caltech.edu/records/mzrjq-6wc02 (101_ObjectCategories.tar.gz)",
        fix_names=_renamed(CALTECH_RENAMES),
    ),
    _split_entry(
        "oxford_pets", "OxfordPets", [("oxford_pets", "images", "CoOp"), ("oxford-iiit-pet", "images", "torchvision")],
        (2944, 736, 3669, 37), "split_zhou_OxfordPets.json",
        "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
    ),
    _split_entry(
        "stanford_cars", "StanfordCars", [("stanford_cars", "", "CoOp and torchvision")],
        (6509, 1635, 8041, 196), "split_zhou_StanfordCars.json",
        "cars_train/ and cars_test/ of the Stanford Cars dataset (the original site is offline; "
        "torchvision's StanfordCars docs list mirrors)",
    ),
    _split_entry(
        "oxford_flowers", "OxfordFlowers", [("oxford_flowers", "jpg", "CoOp"), ("flowers-102", "jpg", "torchvision")],
        (4093, 1633, 2463, 102), "split_zhou_OxfordFlowers.json",
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", fix_names=_flower_names,
    ),
    _split_entry(
        "food101", "Food101", [("food-101", "images", "CoOp and torchvision")],
        (50500, 20200, 30300, 101), "split_zhou_Food101.json",
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)", shipped=False,
    ),
    _entry(
        "fgvc_aircraft", "FGVCAircraft",
        [("fgvc_aircraft", "images", "CoOp"), ("fgvc-aircraft-2013b/data", "images", "torchvision")],
        (3334, 3333, 3333, 100), "official images_variant_{train,val,test}.txt and variants.txt (shipped)",
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
        build_fgvc_aircraft,
    ),
    _split_entry(
        "sun397", "SUN397", [("sun397", "SUN397", "CoOp"), ("SUN397", "", "torchvision")],
        (15880, 3970, 19850, 397), "split_zhou_SUN397.json",
        "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", shipped=False,
    ),
    _split_entry(
        "dtd", "DescribableTextures", [("dtd", "images", "CoOp"), ("dtd/dtd", "images", "torchvision")],
        (2820, 1128, 1692, 47), "split_zhou_DescribableTextures.json",
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
    ),
    _split_entry(
        "eurosat", "EuroSAT", [("eurosat", "2750", "CoOp and torchvision")],
        (13500, 5400, 8100, 10), "split_zhou_EuroSAT.json",
        "https://madm.dfki.de/files/sentinel/EuroSAT.zip (RGB version)", fix_names=_renamed(EUROSAT_NAMES),
    ),
    _split_entry(
        "ucf101", "UCF101", [("ucf101", "UCF-101-midframes", "CoOp")],
        (7639, 1898, 3783, 101), "split_zhou_UCF101.json",
        "CoOp's UCF-101-midframes.zip (middle frames): "
        "https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view",
    ),
    _entry(
        "imagenet_v2", "ImageNetV2",
        [("imagenetv2", "imagenetv2-matched-frequency-format-val", "CoOp"),
         ("imagenetv2-matched-frequency-format-val", "", "archive")],
        (0, 0, 10000, 1000), "test only: folders 0..999 = ImageNet classes in order",
        "https://huggingface.co/datasets/vaishaal/ImageNetV2 (imagenetv2-matched-frequency.tar.gz)",
        build_imagenet_v2,
    ),
    _entry(
        "imagenet_sketch", "ImageNetSketch",
        [("imagenet-sketch", "images", "CoOp"), ("imagenet-sketch", "sketch", "archive")],
        (0, 0, 50889, 1000), "test only: 1000 wnid folders, labels in sorted wnid order",
        "https://github.com/HaohanWang/ImageNet-Sketch", build_imagenet_variant, subset=None,
    ),
    _entry(
        "imagenet_a", "ImageNetA",
        [("imagenet-adversarial", "imagenet-a", "CoOp"), ("imagenet-a", "", "archive")],
        (0, 0, 7500, 200), "test only: 200 wnid folders (shipped list), labels in sorted wnid order",
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", build_imagenet_variant,
        subset="imagenet_a_synsets.txt",
    ),
    _entry(
        "imagenet_r", "ImageNetR",
        [("imagenet-rendition", "imagenet-r", "CoOp"), ("imagenet-r", "", "archive")],
        (0, 0, 30000, 200), "test only: 200 wnid folders (shipped list), labels in sorted wnid order",
        "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", build_imagenet_variant,
        subset="imagenet_r_synsets.txt",
    ),
)

IMAGENET_FAMILY = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
