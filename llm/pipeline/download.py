"""Data acquisition for every pipeline stage: fetch a file, verify its sha256, write it atomically.

Bytes go to `<dest>.part` beside the destination and are renamed to `dest` only once the hash
matches, so a crash or a bad download never leaves a partial or unverified file under the final
name. An interrupted HTTP(S) download resumes from its `.part` with a Range request.

A mirror (argument, or the LLM_MIRROR environment variable) is a local directory or a base URL
holding files under the last path segment of their canonical URL; it is tried first, and a file
it lacks comes from the canonical URL. `url` may also be a local path or `file://` URL, so users
can point the pipeline at their own corpus.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import zipfile
import zlib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlsplit
from urllib.request import Request, url2pathname, urlopen

from llm.errors import LLMError
from llm.progress import progress_bar

CHUNK = 1 << 20
TIMEOUT_S = 60
MIRROR_FROM_ENV = "$LLM_MIRROR"  # default of `mirror`: read os.environ["LLM_MIRROR"] at call time
_BYTES = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
_NET_ERRORS = (OSError, http.client.HTTPException)  # URLError and socket timeouts are OSErrors


class DownloadError(LLMError):
    """A file cannot be fetched, or its bytes do not match the expected sha256."""


class _SourceError(Exception):
    """One source failed; `missing` when it simply lacks the file (HTTP 404, no such file)."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


def sha256_file(path: str | os.PathLike) -> str:
    """Lowercase hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    detail = exc.reason if isinstance(exc, URLError) and not isinstance(exc, HTTPError) else exc
    return " ".join(f"{type(exc).__name__}: {detail}".split())  # one line, whatever the OS said


def expected_sha256(sha256: str | None, url: str) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DownloadError(f"bad sha256 for {url}: {sha256!r} is not 64 hex digits")
    return digest


def _local_path(src: str) -> Path | None:
    """The file a local path or file:// URL names; None for other URLs."""
    if src.startswith("file:"):
        return Path(url2pathname(urlsplit(src).path))
    return None if "://" in src else Path(src)


def _open(src: str, offset: int):
    """Open `src` at byte `offset`; return (stream, total size or None, offset the stream starts at)."""
    path = _local_path(src)
    if path is not None:
        try:
            return path.open("rb"), path.stat().st_size, 0
        except FileNotFoundError:
            raise _SourceError("no such file", missing=True) from None
        except OSError as exc:
            raise _SourceError(_reason(exc)) from None
    headers = {"User-Agent": "llm-from-scratch", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        resp = urlopen(Request(src, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the .part is not a prefix of this file: start over
            return _open(src, 0)
        raise _SourceError(f"HTTP {exc.code} {exc.reason}", missing=exc.code in (404, 410)) from None
    except _NET_ERRORS as exc:
        raise _SourceError(_reason(exc)) from None
    if offset and resp.status != 206:
        offset = 0  # the server ignored Range and sends the whole file
    elif offset and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        resp.close()  # a range we did not ask for
        return _open(src, 0)
    length = resp.headers.get("Content-Length", "")
    return resp, offset + int(length) if length.isdigit() else None, offset


def _download(src: str, expected: str | None, part: Path, progress: bool) -> tuple[str, bool]:
    """Write `src` to `part`, resuming an HTTP(S) .part when a hash can check it; (sha256, resumed)."""
    h, offset = hashlib.sha256(), 0
    if expected and part.is_file() and urlsplit(src).scheme in ("http", "https"):
        with part.open("rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                offset += len(chunk)
        if h.hexdigest() == expected:  # interrupted after the last byte
            return expected, True
    stream, total, start = _open(src, offset)
    if start != offset:
        h, offset = hashlib.sha256(), 0
    name = part.name.removesuffix(".part")
    bar = progress_bar(total=total, initial=offset, desc=name, disable=not progress, **_BYTES)
    with stream, bar, part.open("ab" if offset else "wb") as out:
        try:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        except _NET_ERRORS as exc:  # keep the .part: the next run resumes it
            raise _SourceError(_reason(exc)) from None
    return h.hexdigest(), offset > 0


def _get(src: str, expected: str | None, dest: Path, progress: bool, label: str) -> Path:
    """Fetch `src` into `dest` via its .part; a resumed file failing the hash is refetched whole."""
    part = dest.with_name(dest.name + ".part")
    while True:
        digest, resumed = _download(src, expected, part, progress)
        if expected is None or digest == expected:
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)  # so a retry starts clean
        if not resumed:
            raise DownloadError(f"sha256 mismatch for {label}: expected {expected}, got {digest}")


def url_file_name(url: str) -> str:
    """The file name a URL or path ends in, percent-decoded ("" for none)."""
    return Path(unquote(urlsplit(url).path.rsplit("/", 1)[-1])).name


def _mirror_sources(url: str, mirror: str) -> tuple[str, list[str]]:
    """(the URL's last path segment, where the mirror may hold it: as written, then percent-decoded)."""
    segment = urlsplit(url).path.rsplit("/", 1)[-1]
    decoded = unquote(segment)
    if "://" in mirror:
        base = mirror.rstrip("/")
        return segment, list(dict.fromkeys([f"{base}/{segment}", f"{base}/{quote(decoded)}"]))
    names = [n for n in dict.fromkeys([segment, decoded]) if n not in ("", ".", "..") and "/" not in n]
    return segment, [str(_follow_link_file(Path(mirror, n))) for n in names]


def _follow_link_file(path: Path) -> Path:
    """A symlink copied as a plain file (git without symlink support) holds its target's name:
    follow it to the file beside it. Any other file is returned as it is."""
    try:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 256:
            target = path.read_text(encoding="utf-8").strip()
            if target and "/" not in target and target not in (".", "..") and (path.parent / target).is_file():
                return path.parent / target
    except (OSError, UnicodeDecodeError):
        pass
    return path


def fetch(
    url: str,
    sha256: str | None,
    dest: str | os.PathLike,
    mirror: str | None = MIRROR_FROM_ENV,
    progress: bool = True,
) -> Path:
    """Download (or copy) `url` to `dest`, verify its sha256 and return `dest`.

    `url` is an http(s) or file:// URL or a local path. An existing `dest` with the right hash is
    kept without touching the network. `mirror` defaults to $LLM_MIRROR (None or "" for none) and
    is consulted for http(s) URLs only. `sha256=None` is meant for users' own files: the bytes are
    not verified (and not resumed), only copied atomically, and `dest` is refreshed on every call.
    """
    url, dest = os.fspath(url), Path(dest)
    expected = expected_sha256(sha256, url)
    if expected and dest.is_file() and sha256_file(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mirror == MIRROR_FROM_ENV:
        mirror = os.environ.get("LLM_MIRROR")
    mirror = os.fspath(mirror) if mirror is not None else None  # a Path works too
    note = ""
    if mirror and urlsplit(url).scheme in ("http", "https"):
        segment, sources = _mirror_sources(url, mirror)
        note = f" (mirror {mirror} has no {segment})"
        for src in sources:
            try:
                return _get(src, expected, dest, progress, f"{src} (mirror of {url})")
            except _SourceError as exc:
                if not exc.missing:
                    note = f" (mirror {mirror} failed: {exc})"
                    break
    try:
        return _get(url, expected, dest, progress, url)
    except _SourceError as exc:
        verb = "read" if _local_path(url) else "download"
        raise DownloadError(f"cannot {verb} {url}{note}: {exc}") from None


def extract_member(archive: Path, member: str, expected: str | None, dest: Path, url: str) -> Path:
    """Write `member` of `archive` to `dest` via a .part, verified against `expected`."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if member not in names:
                listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise DownloadError(f"zip {archive} from {url} has no member {member!r}; members: {listed}")
            with zf.open(member) as src, part.open("wb") as out:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"zip {archive} from {url} is corrupt: {' '.join(str(exc).split())}") from None
    digest = h.hexdigest()
    if expected and digest != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(f"sha256 mismatch for {member} in {url}: expected {expected}, got {digest}")
    os.replace(part, dest)
    return dest


def fetch_zip_member(
    url: str,
    member: str,
    sha256: str | None,
    dest: str | os.PathLike,
    mirror: str | None = MIRROR_FROM_ENV,
    progress: bool = True,
) -> Path:
    """Fetch the zip at `url`, extract `member` to `dest` and verify the member's sha256.

    The zip itself is not hashed (a mirrored zip may be packed differently from the original);
    it is cached beside `dest` under its URL name and reused while it yields the right member.
    """
    url, dest = os.fspath(url), Path(dest)
    expected = expected_sha256(sha256, url)
    if expected and dest.is_file() and sha256_file(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = url_file_name(url)
    archive = dest.parent / (name if name not in ("", ".", "..", dest.name) else dest.name + ".zip")
    if archive.is_file():
        try:
            return extract_member(archive, member, expected, dest, url)
        except DownloadError:
            archive.unlink()  # stale or damaged cache: fetch it again below
    fetch(url, None, archive, mirror=mirror, progress=progress)
    try:
        return extract_member(archive, member, expected, dest, url)
    except DownloadError:  # no such member, a corrupt zip or the wrong bytes: keep nothing of it
        archive.unlink(missing_ok=True)
        raise


def fetch_source(src, dest_dir: str | os.PathLike, mirror: str | None = MIRROR_FROM_ENV) -> Path:
    """Fetch a `llm.pipeline.params.Source` (a file, or a member of a zip) into `dest_dir`, verified.

    `dest_dir` ends up holding exactly one file, named after the URL's last segment or the zip
    member, so a reader needs only the folder (`source_file`).
    """
    dest_dir = Path(dest_dir)
    if src.member is not None:
        dest = dest_dir / Path(src.member).name
        fetch_zip_member(src.url, src.member, src.sha256, dest, mirror=mirror)
    else:
        dest = fetch(src.url, src.sha256, dest_dir / (url_file_name(src.url) or "download"), mirror=mirror)
    for other in dest_dir.iterdir():  # e.g. the zip the member came from
        if other != dest:
            other.unlink()
    return dest


def source_file(folder: str | os.PathLike, what: str) -> Path:
    """The one file `fetch_source` left in `folder`; `what` names the setting that asked for it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DownloadError(f"{what} is not a source in sources.yaml (no {folder}/)")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "nothing"
        raise DownloadError(f"{folder} should hold one downloaded file, found {found}: run its download stage")
    return files[0]
