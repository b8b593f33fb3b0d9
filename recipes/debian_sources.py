"""Downloads Debian packages (``apt-get download``) and unpacks them (``dpkg -x``).

Both are cached: a package is downloaded once into a download folder and unpacked
once under ``<download folder>/unpacked/``. Nothing is installed. A ``.deb`` that
is already in the download folder (for instance copied there by hand on a machine
without apt) is used as it is.

Example
-------
>>> root = fetch_package("fortunes-bg", "data/downloads")  # doctest: +SKIP
>>> (root / "usr/share/games/fortunes/bg/bgproverb").is_file()  # doctest: +SKIP
True
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from recipes.executables import require_executables

__all__ = [
    "PackageDownloadError",
    "download_package",
    "fetch_package",
    "unpack_package",
]


class PackageDownloadError(RuntimeError):
    """``apt-get download`` could not fetch a Debian package."""


def download_package(package: str, download_folder: str) -> Path:
    """Return the path of the ``.deb`` of ``package``, downloading it if needed.

    Arguments
    ---------
    package : str
        Debian package name, e.g. ``"fortunes-de"``.
    download_folder : str
        Folder where ``.deb`` files are cached.

    Returns
    -------
    pathlib.Path
        The cached ``<package>_<version>_<arch>.deb``.

    Raises
    ------
    recipes.executables.MissingExecutableError
        When the package is not cached and ``apt-get`` is not installed.
    PackageDownloadError
        When ``apt-get download`` fails (unknown package, no package lists).
    """
    folder = Path(download_folder)
    cached = sorted(folder.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    require_executables({"apt-get": "apt"})
    folder.mkdir(parents=True, exist_ok=True)
    # Download into a private folder first, so that an interrupted download
    # never leaves a partial .deb in the cache.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        result = subprocess.run(
            ["apt-get", "download", "-q", package],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise PackageDownloadError(
                f"'apt-get download {package}' failed (run 'apt-get update' "
                f"first, e.g. with tools/system_deps.sh): {result.stderr.strip()}"
            )
        target = folder / debs[-1].name
        os.replace(debs[-1], target)
    return target


def unpack_package(deb: Path, unpack_folder: str) -> Path:
    """Unpack a ``.deb`` with ``dpkg -x`` (once) and return the unpacked root.

    Arguments
    ---------
    deb : pathlib.Path
        The package file.
    unpack_folder : str
        Folder under which the package is unpacked, in a sub-folder named
        after the ``.deb`` file.

    Returns
    -------
    pathlib.Path
        The folder that holds the package's ``usr/...`` tree.

    Raises
    ------
    recipes.executables.MissingExecutableError
        When ``dpkg`` is not installed.
    """
    root = Path(unpack_folder) / Path(deb).stem
    if root.is_dir():
        return root
    require_executables({"dpkg": "dpkg"})
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():  # not merely unpacked by a concurrent run
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def fetch_package(package: str, download_folder: str) -> Path:
    """Download (if needed) and unpack (if needed) a Debian package.

    Arguments
    ---------
    package : str
        Debian package name.
    download_folder : str
        Cache folder of the ``.deb`` files; unpacked trees go to its
        ``unpacked`` sub-folder.

    Returns
    -------
    pathlib.Path
        The unpacked root of the package (holding ``usr/...``).
    """
    deb = download_package(package, download_folder)
    return unpack_package(deb, os.path.join(download_folder, "unpacked"))
