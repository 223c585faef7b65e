"""What each of the 15 datasets is distributed as, and where each file's content goes under the data root.

A :class:`Recipe` lists the official downloads of one dataset (:class:`Download`): the file name as published,
the folder it extracts to, where its content goes in the CoOp layout that the loaders read, and where it can be
fetched. URLs and md5 sums are torchvision's where torchvision has the same file (a test checks they still
agree); the recipes are data, the code that follows them is in :mod:`vlprompt.data.prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlprompt.data.prepare.convert import imagenet_train, imagenet_val, ucf101_middle_frames
from vlprompt.data.standard import BLOBS, MIRRORS, USER_SPLIT_SOURCES


@dataclass(frozen=True)
class Download:
    """One file as its publisher distributes it, and where its content goes.

    ``top`` is the folder the archive extracts to (``""``: its members sit at the top level, as in the
    ImageNet tars; ``None``: a plain file, copied as is). ``place`` maps paths under ``top`` to paths under
    the dataset folder; ``""`` as a destination means the dataset folder itself. ``convert`` builds the
    dataset folder instead of ``place`` where files must be transformed (ImageNet, UCF101 videos).
    ``instead_of`` names another download of the same recipe that this one may replace (it is then not
    ``required`` itself); ``nested`` is the
    path (under ``top``) of that other file when this one contains it (``caltech-101.zip``).
    ``folder_names`` are other names its extracted folder is known by (``train`` for the ImageNet train tar).
    ``url`` is empty where no program can fetch the file (login, Google Drive, dead host); ``where`` says
    where a person gets it.
    """

    filename: str
    top: str | None
    place: tuple[tuple[str, str], ...] = ()
    url: str = ""
    md5: str = ""
    size: str = ""
    where: str = ""
    required: bool = True
    instead_of: str = ""
    nested: str = ""
    convert: Callable | None = None
    folder_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """The downloads of one dataset; ``folder`` is its CoOp folder under the data root.

    ``user_split`` is the split file users supply themselves (Food101, SUN397), checked by git blob id.
    """

    dataset: str
    folder: str
    downloads: tuple[Download, ...]
    user_split: str = ""
    note: str = ""

    def download(self, filename: str) -> Download:
        return next(d for d in self.downloads if d.filename == filename)


VGG = "https://www.robots.ox.ac.uk/~vgg/data"
IMAGENET_PAGE = "https://image-net.org/download-images.php (free account; ILSVRC2012)"


def split_where(filename: str) -> str:
    """Where users get a split file we cannot ship, and the git blob id it must have."""
    return f"{USER_SPLIT_SOURCES[filename]} {MIRRORS} (git blob {BLOBS[filename]})"


RECIPES: dict[str, Recipe] = {
    recipe.dataset: recipe
    for recipe in (
        Recipe("imagenet", "imagenet", (
            Download(
                "ILSVRC2012_img_train.tar", "", convert=imagenet_train, folder_names=("train",),
                md5="1d675b47d978889d74fa0da5fadfb00e", size="138 GB", where=IMAGENET_PAGE,
            ),
            Download(
                "ILSVRC2012_img_val.tar", "", convert=imagenet_val, folder_names=("val",),
                md5="29b22e2961454d5413ddabcf34fc5622", size="6.3 GB", where=IMAGENET_PAGE,
            ),
            Download(
                "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12", required=False,
                md5="fa75699e90414af021442c21a62c3abf", size="2.5 MB", where=IMAGENET_PAGE,
            ),
        ), note="The devkit (and scipy, to read its meta.mat) is needed to sort the flat val archive into "
                "class folders; a val folder already sorted into wnid folders needs neither."),
        Recipe("caltech101", "caltech-101", (
            Download(
                "101_ObjectCategories.tar.gz", "101_ObjectCategories", (("", "101_ObjectCategories"),),
                md5="b224c7392d521a49829488ab0f1120d9", size="131 MB",
                where="inside caltech-101.zip (below), or older copies of the Caltech page",
            ),
            Download(
                "caltech-101.zip", "caltech-101", required=False, instead_of="101_ObjectCategories.tar.gz",
                nested="101_ObjectCategories.tar.gz",
                url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                md5="3138e1922a9193bfa496528edbbc45d0", size="137 MB",
                where="https://data.caltech.edu/records/mzrjq-6wc02",
            ),
        )),
        Recipe("oxford_pets", "oxford_pets", (
            Download(
                "images.tar.gz", "images", (("", "images"),), url=f"{VGG}/pets/data/images.tar.gz",
                md5="5c4f3ee8e5d25df40f4fd59a7f44e54c", size="755 MB", where=f"{VGG}/pets/",
            ),
            Download(
                "annotations.tar.gz", "annotations", (("", "annotations"),), required=False,
                url=f"{VGG}/pets/data/annotations.tar.gz", md5="95a8c909bbe2e81eed6a22bccdf3f68f", size="18 MB",
                where=f"{VGG}/pets/",
            ),
        )),
        Recipe("stanford_cars", "stanford_cars", (
            Download(
                "cars_train.tgz", "cars_train", (("", "cars_train"),), md5="065e5b463ae28d29e77c1b4b166cfe61",
                size="about 1 GB", where="a mirror, as the original host ai.stanford.edu/~jkrause/car196/ is offline: "
                "https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset (folders, nested twice; pass "
                "them with --from) or https://huggingface.co/datasets/tanganke/stanford_cars (check the md5)",
            ),
            Download(
                "cars_test.tgz", "cars_test", (("", "cars_test"),), md5="4ce7ebf6a94d07f1952d94dd34c4d501",
                size="about 1 GB", where="the same places as cars_train.tgz",
            ),
            Download(
                "car_devkit.tgz", "devkit", (("", "devkit"),), required=False,
                md5="c3b158d763b6e2245038c8ad08e45376",
                where="https://github.com/pytorch/vision/files/11644847/car_devkit.tgz (pytorch/vision#7545)",
            ),
        ), note="Only the images are read; the devkit and .mat files are not needed."),
        Recipe("oxford_flowers", "oxford_flowers", (
            Download(
                "102flowers.tgz", "jpg", (("", "jpg"),), url=f"{VGG}/flowers/102/102flowers.tgz",
                md5="52808999861908f626f3c1f4e79d11fa", size="329 MB", where=f"{VGG}/flowers/102/",
            ),
            Download(
                "imagelabels.mat", None, (("", "imagelabels.mat"),), required=False,
                url=f"{VGG}/flowers/102/imagelabels.mat", md5="e0620be6f572b9609742df49c70aed4d",
                where=f"{VGG}/flowers/102/",
            ),
        ), note="imagelabels.mat is not needed: the labels come from the shipped split file and "
                "cat_to_name.json (no scipy needed)."),
        Recipe("food101", "food-101", (
            Download(
                "food-101.tar.gz", "food-101", (("", ""),), url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                md5="85eeb15f3717b99a5da872d97d918f87", size="5 GB",
                where="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
            ),
        ), user_split="split_zhou_Food101.json"),
        Recipe("fgvc_aircraft", "fgvc_aircraft", (
            Download(
                "fgvc-aircraft-2013b.tar.gz", "fgvc-aircraft-2013b", (("data", ""),),
                url=f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", size="2.75 GB",
                where=f"{VGG}/fgvc-aircraft/",
            ),
        ), note="Only data/ is kept (as CoOp does); the split lists are shipped with vlprompt."),
        Recipe("sun397", "sun397", (
            Download(
                "SUN397.tar.gz", "SUN397", (("", "SUN397"),),
                url="http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                md5="8ca2778205c41d23104230ba66911c7a", size="37 GB",
                where="https://vision.princeton.edu/projects/2010/SUN/ (reported offline since 2025, "
                "pytorch/vision#9348; a copy is reported at opendatalab.com/OpenDataLab/SUN397, check the md5)",
            ),
        ), user_split="split_zhou_SUN397.json", note="Partitions.zip is not needed."),
        Recipe("dtd", "dtd", (
            Download(
                "dtd-r1.0.1.tar.gz", "dtd", (("", ""),), url=f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz",
                md5="fff73e5086ae6bdbea199a49dfb8a4c1", size="0.6 GB", where=f"{VGG}/dtd/",
            ),
        )),
        Recipe("eurosat", "eurosat", (
            Download(
                "EuroSAT.zip", "2750", (("", "2750"),),
                url="https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                    "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                md5="c8fa014336c82ac7804f0398fcb19387", size="90 MB",
                where="https://github.com/phelber/EuroSAT (the original madm.dfki.de link has an expired "
                "certificate; torchvision fetches the unmodified file from the torchgeo mirror above)",
            ),
            Download(
                "EuroSAT_RGB.zip", "EuroSAT_RGB", (("", "2750"),), required=False, instead_of="EuroSAT.zip",
                where="https://zenodo.org/records/7711810 (the authors' current copy; extracts to EuroSAT_RGB/, "
                "which becomes 2750/; not checked to be byte-identical to EuroSAT.zip, verify checks every file)",
            ),
        )),
        Recipe("ucf101", "ucf101", (
            Download(
                "UCF-101-midframes.zip", "UCF-101-midframes", (("", "UCF-101-midframes"),),
                where="CoOp's Google Drive: https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view",
            ),
            Download(
                "UCF101.rar", "UCF-101", required=False, instead_of="UCF-101-midframes.zip",
                convert=ucf101_middle_frames,
                size="6.5 GB", where="https://www.crcv.ucf.edu/data/UCF101.php (a RAR archive: extract it with "
                "unrar or 7z and pass the UCF-101 folder; vlprompt then takes the middle frame of each video)",
            ),
        ), note="Middle frames extracted here are not byte-identical to CoOp's JPEGs; for exact comparability "
                "with published numbers use UCF-101-midframes.zip."),
        Recipe("imagenet_v2", "imagenetv2", (
            Download(
                "imagenetv2-matched-frequency.tar.gz", "imagenetv2-matched-frequency-format-val",
                (("", "imagenetv2-matched-frequency-format-val"),), size="1.2 GB",
                url="https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                    "imagenetv2-matched-frequency.tar.gz",
                where="https://github.com/modestyachts/ImageNetV2 (the authors' copy on Hugging Face, which "
                "their own loader uses; older instructions name an S3 bucket)",
            ),
        )),
        Recipe("imagenet_sketch", "imagenet-sketch", (
            Download(
                "ImageNet-Sketch.zip", "sketch", (("", "images"),), size="7.8 GB",
                url="https://huggingface.co/datasets/songweig/imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip",
                where="https://github.com/HaohanWang/ImageNet-Sketch (Google Drive "
                "1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA; the Hugging Face copy is the authors')",
            ),
        )),
        Recipe("imagenet_a", "imagenet-adversarial", (
            Download(
                "imagenet-a.tar", "imagenet-a", (("", "imagenet-a"),),
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                md5="c3e55429088dc681f30d81f4726b6595",  # as torch-uncertainty's loader checks it
                where="https://github.com/hendrycks/natural-adv-examples",
            ),
        )),
        Recipe("imagenet_r", "imagenet-rendition", (
            Download(
                "imagenet-r.tar", "imagenet-r", (("", "imagenet-r"),),
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                md5="a61312130a589d0ca1a8fca1f2bd3337",  # as torch-uncertainty's loader checks it
                where="https://github.com/hendrycks/imagenet-r",
            ),
        )),
    )
}
