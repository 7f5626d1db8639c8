"""Files we fetch or open by name, checked against pinned hashes before anything reads them.

``download_verified`` fetches the missing files of a dataset and keeps one only when its sha256
is the pinned one (a mismatch is a one-line error and the bytes are thrown away, so the next run
downloads again instead of trusting them). ``check_known_release`` guards raw formats that are
pickles (Planetoid, CIFAR-10's python batches): they are opened only when every file's hash is
the one of the published release, or when the user says the folder is trusted (their own export,
a generator's output). Either way they are then read by ``safe_loading.load_plain_pickle``, so a
trusted folder means "accept other data", never "run code".
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_xd.errors import DataError
from lightning_xd.files import atomic_write, file_digest, make_folder


def download_verified(folder: Path, pins: dict[str, str], base_url: str, what: str, timeout: float = 20) -> None:
    """Fetch the files of ``pins`` (name: sha256) missing from ``folder`` from ``base_url``.

    A file is kept only when its sha256 is the pinned one; a failed download or a mismatch is a
    one-line ``DataError`` and nothing is left behind. ``XD_DOWNLOAD=0`` turns downloads off
    (machines without internet fail at once instead of waiting for a timeout)."""
    import urllib.request

    missing = [name for name in pins if not (folder / name).is_file()]
    if not missing:
        return
    hint = f"{what}: put {', '.join(missing)} in {folder}"
    if os.environ.get("XD_DOWNLOAD", "1") == "0":
        raise DataError(f"{hint} (downloads are off: XD_DOWNLOAD=0)")
    try:
        make_folder(folder)
    except OSError:
        raise DataError(f"{hint} (the folder is not writable, so they cannot be downloaded)") from None
    for name in missing:
        url = f"{base_url}/{name}"
        with atomic_write(folder / name) as tmp:  # renamed into place only if the block ends normally
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    tmp.write_bytes(response.read())
            except Exception as err:  # no network, 404, timeout ...
                raise DataError(f"{hint} (download from {base_url} failed: {type(err).__name__})") from None
            got = file_digest(tmp)
            if got != pins[name]:
                raise DataError(
                    f"{what}: {url} sent a file whose sha256 is {got[:16]}..., not the pinned "
                    f"{pins[name][:16]}...; it was not kept (put the original {name} in {folder})"
                )


def check_known_release(
    folder: Path, pins: dict[str, str], what: str, trusted: bool | None, algorithm: str = "sha256"
) -> None:
    """One-line ``DataError`` unless every file of ``pins`` in ``folder`` has its pinned hash, or
    ``trusted`` (the user's ``--trust-data-dir``; None: ``XD_TRUST_DATA_DIR=1``) accepts files of
    another origin."""
    if trusted or (trusted is None and os.environ.get("XD_TRUST_DATA_DIR", "0") == "1"):
        return
    changed = [name for name, expected in pins.items() if file_digest(folder / name, algorithm) != expected]
    if changed:
        raise DataError(
            f"{what}: {', '.join(changed)} in {folder} differ from the published release ({algorithm} pinned), "
            "and these files are pickles, which are opened only when they are the release's; put the "
            "originals there, or pass --trust-data-dir if you made these files yourself"
        )
