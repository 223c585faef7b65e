"""File plumbing for ``vlprompt data prepare``: safe extraction, linking folders, downloading with a deadline.

Nothing here deletes or writes outside the destination it is given; the caller passes paths inside its
temporary folder. Extraction refuses members named with an absolute path or a ``..`` component (zip and tar
alike), links leaving the destination (tar), and archives that would unpack to more than
:class:`ExtractLimits` allow (an archive bomb), before writing the member that crosses the limit.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import tarfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from vlprompt.errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
CHUNK = 1 << 20
CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
UNSAFE = getattr(tarfile, "FilterError", ())  # Python >= 3.10.12 / 3.11.4
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExtractLimits:
    """How much one archive may unpack to: ``max_bytes`` in all, and ``max_ratio`` times its own size plus
    ``allowance`` (so that a small archive of text files is not refused).

    The official archives hold images, which do not compress: they unpack to about their own size (ImageNet's
    train tar, the largest, to 138 GB). An archive far above that is a bomb, or not the official file.
    """

    max_bytes: int = 300 * 10**9
    max_ratio: float = 20.0
    allowance: int = 32 * 10**6

    def budget(self, archive_bytes: int) -> tuple[int, str]:
        """The most bytes an archive of ``archive_bytes`` may unpack to, and which limit sets it."""
        by_ratio = int(self.max_ratio * archive_bytes) + self.allowance
        if by_ratio <= self.max_bytes:
            return by_ratio, f"{self.max_ratio:g} times its size of {human_bytes(archive_bytes)}, plus " \
                             f"{human_bytes(self.allowance)}; --max-extract-ratio raises it"
        return self.max_bytes, "the extraction size limit; --max-extract-size raises it"


def human_bytes(count: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as download pages give sizes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.3g} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.3g} TB"


def parse_bytes(text: str) -> int:
    """``"300GB"``, ``"1.5 TB"``, ``"500M"``, ``"1048576"`` -> bytes (decimal units; ``KiB``-style binary ones)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    cleaned = str(text).strip().lower().replace(" ", "").removesuffix("b")
    number = cleaned.rstrip("kmgti")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ValueError(f"expected a size such as 500MB, 300GB or 1TB, got {text!r}")
    return int(value * units[unit])


def unsafe_member_name(name: str) -> bool:
    """True for an archive member named with an absolute path or a ``..`` component (``2750/../x``)."""
    normalized = name.replace("\\", "/")
    return normalized.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in normalized.split("/")


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def top_level_names(path: str, limit: int = 50) -> list[str]:
    """The first distinct top-level names inside archive ``path`` (cheap: stops after ``limit`` members)."""
    names: list[str] = []
    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                members = [info.filename for info in archive.infolist()[:limit]]
        else:
            with tarfile.open(path) as archive:
                members = []
                for member in archive:
                    members.append(member.name)
                    if len(members) >= limit:
                        break
    except (*CORRUPT, OSError) as error:
        raise DataError(f"{path} cannot be read as an archive ({error}); it is probably incomplete: "
                        "download it again") from None
    for name in members:
        first = name.lstrip("./").split("/", 1)[0]
        if first and first != "__MACOSX" and first not in names:
            names.append(first)
    return names


def _extract_member(archive, member, dest: str) -> None:
    """Extract one member; a module-level function so that tests can interrupt an extraction midway."""
    if isinstance(archive, zipfile.ZipFile):
        archive.extract(member, dest)
    elif hasattr(tarfile, "data_filter"):
        archive.extract(member, dest, filter="data")
    else:  # Python < 3.10.12 / 3.11.4: refuse what the data filter refuses that matters here
        name = os.path.normpath(member.name)
        if os.path.isabs(name) or name.startswith("..") or member.issym() or member.isdev():
            raise DataError(f"archive member {member.name!r} would be written outside {dest}; refusing it")
        archive.extract(member, dest)


def extract(path: str, dest: str, log: Log, *, rename: Callable[[str], str | None] | None = None,
            fileobj=None, archive_bytes: int | None = None, limits: ExtractLimits = ExtractLimits(),
            md5: str = "", size: str = "") -> int:
    """Extract archive ``path`` (or the tar stream ``fileobj`` of ``archive_bytes`` bytes) into ``dest``;
    returns the member count.

    A member named with an absolute path or a ``..`` component is refused (zip and tar); tar members then go
    through tarfile's ``data`` filter (no links leaving ``dest``). The members' sizes, as their headers declare
    them (zipfile and tarfile never write more), are added up before each is written: past
    ``limits.budget(archive_bytes)`` the archive is refused. ``rename(name)`` may give a member a new relative
    name (``None`` skips it). A truncated or corrupt archive is a :class:`DataError` naming it.
    """
    os.makedirs(dest, exist_ok=True)
    budget, which = limits.budget(os.path.getsize(path) if archive_bytes is None else archive_bytes)
    count = total = 0

    def admit(member_name: str, member_bytes: int) -> None:
        nonlocal total
        if unsafe_member_name(member_name):
            raise DataError(f"{path} holds a member that would be written outside the data root "
                            f"({member_name!r}); this is not the official archive")
        total += member_bytes
        if total > budget:
            raise DataError(f"{path} unpacks to more than {human_bytes(budget)} ({which}); refusing it as a "
                            "possible archive bomb, or not the official file")

    def keep(member_name: str) -> str | None:
        return member_name if rename is None else rename(member_name)

    try:
        if fileobj is None and path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
                for info in members:  # the zip directory lists every member: check them all before writing
                    admit(info.filename, info.file_size)
                for info in members:
                    if (name := keep(info.filename)) is None:
                        continue
                    info.filename = name
                    _extract_member(archive, info, dest)
                    count += 1
        else:
            mode = "r|*" if fileobj is not None else "r:*"
            with tarfile.open(None if fileobj is not None else path, mode, fileobj=fileobj) as archive:
                for member in archive:
                    admit(member.name, member.size if member.isfile() else 0)
                    if (name := keep(member.name)) is None:
                        continue
                    member.name = name
                    _extract_member(archive, member, dest)
                    count += 1
                    if count % 20000 == 0:
                        log(f"  {count} files")
    except UNSAFE as error:
        raise DataError(f"{path} holds a member that would be written outside the data root ({error}); "
                        "this is not the official archive") from None
    except CORRUPT as error:
        expected = ", ".join(x for x in (f"md5 {md5}" if md5 else "", size) if x)
        raise DataError(
            f"{path} cannot be extracted ({type(error).__name__}: {error}); the file is probably incomplete or "
            f"corrupt: download it again{f' (expected {expected})' if expected else ''}"
        ) from None
    return count


def link_tree(source: str, dest: str) -> int:
    """Recreate folder ``source`` at ``dest`` with hard links (copies across file systems); returns files.

    The user's folder is only read: later steps rename and delete inside ``dest`` only, which never touches
    the files behind the links' other names.
    """
    count = 0
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        target = os.path.join(dest, os.path.relpath(folder, source))
        os.makedirs(target, exist_ok=True)
        for name in files:
            link_file(os.path.join(folder, name), os.path.join(target, name))
            count += 1
    return count


def link_file(source: str, dest: str) -> None:
    """Hard-link ``source`` as ``dest``, or copy it where links are impossible (another file system)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def md5_of(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_url(url: str, timeout: float):
    """``urlopen(url)`` that gives up after ``timeout`` seconds even while resolving the host name.

    Socket timeouts do not cover DNS look-ups, which can block for a minute on a machine without network;
    the request runs in a daemon thread that is abandoned when the deadline passes.
    """
    result: dict = {}

    def attempt() -> None:
        try:
            result["response"] = urlopen(Request(url, headers={"User-Agent": "vlprompt"}), timeout=timeout)
        except BaseException as error:  # handed to the caller's thread
            result["error"] = error

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if thread.is_alive():
        raise TimeoutError(f"no answer from {urlparse(url).netloc} within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["response"]


def describe_network_error(error: BaseException) -> str:
    if isinstance(error, HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"


NETWORK_ERRORS = (URLError, TimeoutError, OSError)


def fetch(url: str, dest: str, *, md5: str = "", timeout: float = 10.0, log: Log = print) -> None:
    """Download ``url`` to ``dest`` through ``dest.part`` (renamed only when complete and, given ``md5``, intact).

    Raises the network error (URLError, HTTPError, TimeoutError, OSError) for the caller to explain, or a
    :class:`DataError` when the download is not the expected file.
    """
    part = dest + ".part"
    with open_url(url, timeout) as response:
        total = response.headers.get("Content-Length")
        log(f"downloading {url} ({int(total) / 1e6:.1f} MB)" if total else f"downloading {url}")
        done, shown = 0, 0
        with open(part, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if total and done * 20 // int(total) > shown:
                    shown = done * 20 // int(total)
                    log(f"  {shown * 5}%")
    if md5:
        actual = md5_of(part)
        if actual != md5:
            os.remove(part)
            raise DataError(f"the download of {url} has md5 {actual}, expected {md5}: the host serves another "
                            "file or the transfer was cut; try again or fetch it by hand")
    os.replace(part, dest)
