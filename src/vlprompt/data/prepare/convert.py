"""Downloads that cannot simply be moved into place: the ImageNet train/val tars and the UCF101 videos.

Each converter receives a :class:`Step` (the user's archive or folder, and the dataset folder being built
inside the temporary folder) and fills ``step.dataset_dir``; it never writes anywhere else.
"""

from __future__ import annotations

import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from vlprompt.data.base import parse_split_json
from vlprompt.data.prepare.files import CORRUPT, ExtractLimits, Log, extract, link_file, link_tree
from vlprompt.data.standard import packaged
from vlprompt.errors import DataError

DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm")


@dataclass
class Step:
    """One input to convert: ``path`` (archive or folder), the dataset folder to fill, a scratch folder."""

    path: str
    is_folder: bool
    dataset_dir: str
    work: str
    others: dict[str, str] = field(default_factory=dict)  # filename -> path of the other inputs
    log: Log = print
    limits: ExtractLimits = ExtractLimits()


def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


# --- ImageNet ----------------------------------------------------------------------------------------------


def imagenet_train(step: Step) -> None:
    """``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class) -> ``images/train/<wnid>/``.

    A folder is either the tar's content (the 1000 class tars) or already one folder per wnid.
    """
    dest = os.path.join(step.dataset_dir, "images", "train")
    if step.is_folder:
        class_tars = sorted(n for n in os.listdir(step.path) if n.endswith(".tar"))
        if not class_tars:
            link_tree(step.path, dest)
            return
        for done, name in enumerate(class_tars):
            extract(os.path.join(step.path, name), os.path.join(dest, name[: -len(".tar")]), step.log,
                    limits=step.limits)
            if done % 100 == 99:
                step.log(f"  {done + 1} of {len(class_tars)} classes")
        return
    try:
        with tarfile.open(step.path) as outer:
            done = 0
            for member in outer:
                if not (member.isfile() and member.name.endswith(".tar")):
                    continue
                wnid = os.path.basename(member.name)[: -len(".tar")]
                inner = outer.extractfile(member)
                extract(f"{step.path}:{member.name}", os.path.join(dest, wnid), step.log, fileobj=inner,
                        archive_bytes=member.size, limits=step.limits)
                done += 1
                if done % 100 == 0:
                    step.log(f"  {done} classes")
    except CORRUPT as error:
        raise DataError(f"{step.path} cannot be extracted ({error}); it is probably incomplete: download it "
                        "again (md5 1d675b47d978889d74fa0da5fadfb00e)") from None


def _val_wnids(step: Step) -> list[str]:
    """wnid of val image i (1-based) at index i - 1, from the devkit's meta.mat and ground-truth list."""
    devkit = step.others.get(DEVKIT)
    if devkit is None:
        raise DataError(
            f"{step.path} holds the 50,000 val images in one flat folder; sorting them into class folders needs "
            f"{DEVKIT} (md5 fa75699e90414af021442c21a62c3abf, https://image-net.org/download-images.php): pass it "
            "with --from, or pass a val folder already sorted into wnid folders"
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"reading data/meta.mat of {DEVKIT} needs scipy (pip install scipy); or pass a val folder already "
            "sorted into wnid folders (torchvision's ImageNet(root, split='val') makes one)"
        ) from None
    if not os.path.isdir(devkit):
        extract(devkit, os.path.join(step.work, "devkit"), step.log, limits=step.limits)
        devkit = os.path.join(step.work, "devkit", "ILSVRC2012_devkit_t12")
    meta_file = os.path.join(devkit, "data", "meta.mat")
    truth_file = os.path.join(devkit, "data", "ILSVRC2012_validation_ground_truth.txt")
    for path in (meta_file, truth_file):
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: {DEVKIT} is not the official devkit")
    synsets = loadmat(meta_file, squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    with open(truth_file) as file:
        return [id_to_wnid[int(line)] for line in file if line.strip()]


VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")


def imagenet_val(step: Step) -> None:
    """``ILSVRC2012_img_val.tar`` (flat) -> ``images/val/<wnid>/``, sorted with the devkit's labels.

    A folder already sorted into wnid folders is linked as it is.
    """
    dest = os.path.join(step.dataset_dir, "images", "val")
    if step.is_folder and _subfolders(step.path):
        link_tree(step.path, dest)
        return
    wnids = _val_wnids(step)

    def sorted_name(name: str) -> str | None:
        match = VAL_NAME.search(name)
        if match is None:
            return None
        index = int(match.group(1))
        if not 1 <= index <= len(wnids):
            raise DataError(f"{step.path}: {name} has no label in the devkit's ground truth ({len(wnids)} images)")
        return f"{wnids[index - 1]}/{os.path.basename(name)}"

    if not step.is_folder:
        extract(step.path, dest, step.log, rename=sorted_name, limits=step.limits,
                md5="29b22e2961454d5413ddabcf34fc5622")
        return
    for name in sorted(os.listdir(step.path)):
        target = sorted_name(name)
        if target is not None:
            os.makedirs(os.path.dirname(os.path.join(dest, target)), exist_ok=True)
            link_file(os.path.join(step.path, name), os.path.join(dest, target))


# --- UCF101 ------------------------------------------------------------------------------------------------


def middle_frame_reader() -> Callable:
    """A function ``path -> PIL.Image`` giving frame ``n // 2`` (0-based) of a video with ``n`` frames.

    Uses the first importable of torchcodec, PyAV (``av``) and OpenCV (``cv2``); torchvision no longer
    decodes video.
    """
    from PIL import Image

    try:
        from torchcodec.decoders import VideoDecoder

        def read(path: str):
            decoder = VideoDecoder(path)
            frame = decoder[len(decoder) // 2]  # (C, H, W) uint8
            return Image.fromarray(frame.permute(1, 2, 0).numpy())

        return read
    except (ImportError, OSError, RuntimeError):  # torchcodec raises these when its FFmpeg libraries are missing
        pass
    try:
        import av

        def read(path: str):
            with av.open(path) as container:
                frames = list(container.decode(video=0))
            if not frames:
                raise DataError(f"{path} has no video frames")
            return frames[len(frames) // 2].to_image()

        return read
    except ImportError:
        pass
    try:
        import cv2

        def read(path: str):
            capture = cv2.VideoCapture(path)
            try:
                count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
                capture.set(cv2.CAP_PROP_POS_FRAMES, count // 2)
                ok, frame = capture.read()
            finally:
                capture.release()
            if not ok:
                raise DataError(f"{path}: frame {count // 2} cannot be decoded")
            return Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))

        return read
    except ImportError:
        pass
    raise DataError(
        "extracting the middle frame of each UCF101 video needs a video decoder, and none is installed: "
        "pip install av (or torchcodec, or opencv-python). Or pass CoOp's pre-extracted UCF-101-midframes.zip "
        "(https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view) instead of the videos"
    )


def ucf101_middle_frames(step: Step) -> None:
    """The videos of ``UCF101.rar`` (extracted: ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``) -> middle frames.

    Writes ``UCF-101-midframes/<path in the split>`` for every video the shipped split lists; the video of
    ``Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg`` is found by its name, wherever it is in the folder
    (the class folders of the videos are named differently, e.g. ``HandstandPushups`` holds
    ``v_HandStandPushups_*``).
    """
    if not step.is_folder:
        raise DataError(
            f"{step.path} is a RAR archive, which Python cannot read: extract it first (unrar x UCF101.rar, or "
            "7z x UCF101.rar) and pass the extracted UCF-101 folder with --from"
        )
    read = middle_frame_reader()
    split = parse_split_json(packaged("split_zhou_UCF101.json"), "split_zhou_UCF101.json")
    videos = {}
    for folder, _, files in os.walk(step.path):
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() in VIDEO_EXTENSIONS:
                videos[stem] = os.path.join(folder, name)
    wanted = list(dict.fromkeys(rel for key in ("train", "val", "test") for rel, _, _ in split[key]))
    missing = [rel for rel in wanted if os.path.splitext(os.path.basename(rel))[0] not in videos]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(wanted)} videos the UCF101 split lists are not in {step.path} (first: "
            f"{', '.join(missing[:3])}); pass the complete UCF-101 folder extracted from UCF101.rar"
        )
    dest = os.path.join(step.dataset_dir, "UCF-101-midframes")

    def convert(rel: str) -> None:
        video = videos[os.path.splitext(os.path.basename(rel))[0]]
        try:
            image = read(video).convert("RGB")
        except DataError:
            raise
        except Exception as error:  # decoders raise their own types
            raise DataError(f"{video} cannot be decoded ({type(error).__name__}: {error})") from None
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        image.save(target, "JPEG", quality=95)

    step.log(f"  extracting the middle frame of {len(wanted)} videos")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(convert, wanted), 1):
            if done % 1000 == 0:
                step.log(f"  {done} of {len(wanted)} videos")
