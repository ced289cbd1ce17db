"""A verified mirror of the public inputs, for `LLM_MIRROR`: what CI caches between runs.

Not a stage's code (no stage imports it): `ci/fill_mirror.py` runs it where the CI workflow's
cache of the mirror, keyed on sources.yaml, missed, and to verify one that was restored.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from llm.pipeline.download import DownloadError, expected_sha256, extract_member, fetch, url_file_name


def fill_mirror(sources: dict, mirror: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Make `mirror` a directory that `LLM_MIRROR` can point at: each downloadable source of
    `sources` (`sources.load_sources`) under its URL's last path segment, fetched from its
    canonical URL and verified: a file by its sha256, a zip by the sha256 of its member (the zip
    is kept whole, as a mirror serves it). A file already there that verifies is kept without
    touching the network; local sources (a path, file://) are not mirrored. Returns the files."""
    mirror = Path(mirror)
    mirror.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sources.values():
        if urlsplit(src.url).scheme not in ("http", "https"):
            continue
        dest = mirror / url_file_name(src.url)
        if src.member is None:
            files.append(fetch(src.url, src.sha256, dest, mirror=None, progress=progress))
            continue
        expected = expected_sha256(src.sha256, src.url)
        check = mirror / f".{dest.name}.member"  # the member, extracted only to verify it
        try:
            if dest.is_file():
                try:
                    extract_member(dest, src.member, expected, check, src.url)
                except DownloadError:
                    dest.unlink()  # stale or damaged: fetched again below
            if not dest.is_file():
                fetch(src.url, None, dest, mirror=None, progress=progress)
                extract_member(dest, src.member, expected, check, src.url)
        except DownloadError:
            dest.unlink(missing_ok=True)  # a zip whose member does not verify is not left in the mirror
            raise
        finally:
            check.unlink(missing_ok=True)
        files.append(dest)
    return files
