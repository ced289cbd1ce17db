"""Downloads: verify, skip, resume, mirrors, local files, zip members and one-line errors.

A local HTTP server on 127.0.0.1 serves bytes from a dict, honours `Range: bytes=N-` with 206
(unless told to ignore it) and records every request, so tests can assert what went over the wire.
"""

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llm.errors import LLMError
from llm.pipeline.download import DownloadError, fetch, fetch_source, fetch_zip_member, sha256_file, source_file
from tests.test_progress import on_terminal

BODY = bytes(range(256)) * 40 + b"the end"  # a few KiB, not a multiple of anything
SHA = hashlib.sha256(BODY).hexdigest()
VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Test double for a file host: `files` maps request paths to bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.ignore_range = False
        self.fail: int | None = None  # answer every request with this HTTP status
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            server.requests.append((self.path, rng))
            body = server.files.get(self.path)
            if server.fail or body is None:
                self.send_error(server.fail or 404)
                return
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            start = int(m[1]) if m and not server.ignore_range else 0
            if start >= len(body) > 0:
                self.send_error(416)
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_env_mirror(monkeypatch):
    monkeypatch.delenv("LLM_MIRROR", raising=False)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def _no_leftovers(dest: Path):
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


def test_sha256_file_streams_in_chunks(tmp_path):
    data = b"x" * (2 * 1024 * 1024 + 3)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == _sha(data)


def test_fetch_downloads_and_verifies(server, tmp_path):
    server.files["/data/file.txt"] = BODY
    dest = tmp_path / "sub" / "file.txt"
    assert fetch(server.url("/data/file.txt"), SHA, dest, progress=False) == dest
    assert dest.read_bytes() == BODY and sha256_file(dest) == SHA
    assert not (tmp_path / "sub" / "file.txt.part").exists()
    assert server.requests == [("/data/file.txt", None)]


def test_fetch_accepts_uppercase_hash_and_shows_progress(server, tmp_path, monkeypatch):
    terminal = on_terminal(monkeypatch)
    server.files["/f"] = BODY
    fetch(server.url("/f"), SHA.upper(), tmp_path / "f", progress=True)
    assert (tmp_path / "f").read_bytes() == BODY
    assert "10.0k" in terminal.getvalue()  # the bar counts bytes against Content-Length


def test_skip_when_already_verified(server, tmp_path):
    dest = tmp_path / "file.txt"
    dest.write_bytes(BODY)
    fetch(server.url("/file.txt"), SHA, dest, progress=False)
    assert server.requests == []
    assert dest.read_bytes() == BODY


def test_existing_file_with_wrong_hash_is_fetched_again(server, tmp_path):
    server.files["/file.txt"] = BODY
    dest = tmp_path / "file.txt"
    dest.write_bytes(b"stale")
    fetch(server.url("/file.txt"), SHA, dest, progress=False)
    assert dest.read_bytes() == BODY and len(server.requests) == 1


def test_resume_after_partial_download(server, tmp_path):
    server.files["/file.txt"] = BODY
    dest = tmp_path / "file.txt"
    half = len(BODY) // 2
    (tmp_path / "file.txt.part").write_bytes(BODY[:half])
    fetch(server.url("/file.txt"), SHA, dest, progress=False)
    assert server.requests == [("/file.txt", f"bytes={half}-")]
    assert sha256_file(dest) == SHA
    assert not (tmp_path / "file.txt.part").exists()


def test_complete_part_is_renamed_without_a_request(server, tmp_path):
    (tmp_path / "file.txt.part").write_bytes(BODY)
    fetch(server.url("/file.txt"), SHA, tmp_path / "file.txt", progress=False)
    assert server.requests == [] and (tmp_path / "file.txt").read_bytes() == BODY


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/file.txt"] = BODY
    server.ignore_range = True
    half = len(BODY) // 2
    (tmp_path / "file.txt.part").write_bytes(BODY[:half])
    fetch(server.url("/file.txt"), SHA, tmp_path / "file.txt", progress=False)
    assert server.requests == [("/file.txt", f"bytes={half}-")]  # asked, got a 200 with everything
    assert (tmp_path / "file.txt").read_bytes() == BODY


def test_corrupt_part_is_discarded_and_downloaded_whole(server, tmp_path):
    server.files["/file.txt"] = BODY
    (tmp_path / "file.txt.part").write_bytes(b"garbage" * 10)
    fetch(server.url("/file.txt"), SHA, tmp_path / "file.txt", progress=False)
    assert server.requests == [("/file.txt", "bytes=70-"), ("/file.txt", None)]
    assert (tmp_path / "file.txt").read_bytes() == BODY


def test_part_longer_than_file_starts_over(server, tmp_path):
    server.files["/file.txt"] = BODY
    (tmp_path / "file.txt.part").write_bytes(b"z" * (len(BODY) + 5))
    fetch(server.url("/file.txt"), SHA, tmp_path / "file.txt", progress=False)
    assert [r[1] for r in server.requests] == [f"bytes={len(BODY) + 5}-", None]  # 416, then whole
    assert (tmp_path / "file.txt").read_bytes() == BODY


def test_checksum_mismatch(server, tmp_path):
    server.files["/file.txt"] = BODY
    wrong = _sha(b"something else")
    dest = tmp_path / "file.txt"
    with pytest.raises(DownloadError) as excinfo:
        fetch(server.url("/file.txt"), wrong, dest, progress=False)
    msg = _one_line_error(excinfo)
    assert server.url("/file.txt") in msg and wrong in msg and SHA in msg
    _no_leftovers(dest)


def test_http_404(server, tmp_path):
    dest = tmp_path / "missing.txt"
    with pytest.raises(LLMError) as excinfo:
        fetch(server.url("/missing.txt"), SHA, dest, progress=False)
    msg = _one_line_error(excinfo)
    assert server.url("/missing.txt") in msg and "HTTP 404" in msg
    _no_leftovers(dest)


def test_http_500(server, tmp_path):
    server.files["/file.txt"] = BODY
    server.fail = 500
    with pytest.raises(DownloadError) as excinfo:
        fetch(server.url("/file.txt"), SHA, tmp_path / "file.txt", progress=False)
    assert "HTTP 500" in _one_line_error(excinfo)


def test_connection_refused(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.txt"
    with pytest.raises(DownloadError) as excinfo:
        fetch(url, SHA, tmp_path / "file.txt", progress=False)
    msg = _one_line_error(excinfo)
    assert msg.startswith(f"cannot download {url}: ") and "URLError" in msg


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(DownloadError, match="not 64 hex digits"):
        fetch("http://127.0.0.1:1/f", "abc", tmp_path / "f", progress=False)


def test_mirror_directory_hit(server, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "sms+spam+collection.zip").write_bytes(BODY)
    dest = tmp_path / "out" / "data.zip"
    fetch(server.url("/static/sms+spam+collection.zip"), SHA, dest, mirror=str(mirror), progress=False)
    assert server.requests == []
    assert dest.read_bytes() == BODY


def test_mirror_link_copied_as_a_file_is_followed(server, tmp_path):
    """A mirror whose symlink `input.txt -> tinyshakespeare.txt` was copied as a 19-byte text file."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinyshakespeare.txt").write_bytes(BODY)
    (mirror / "input.txt").write_text("tinyshakespeare.txt")
    fetch(server.url("/data/input.txt"), SHA, tmp_path / "out.txt", mirror=str(mirror), progress=False)
    assert server.requests == [] and (tmp_path / "out.txt").read_bytes() == BODY


def test_mirror_directory_percent_decoded_name(server, tmp_path):
    (tmp_path / "my file.txt").write_bytes(BODY)
    fetch(server.url("/a/my%20file.txt"), SHA, tmp_path / "out.txt", mirror=str(tmp_path), progress=False)
    assert server.requests == [] and (tmp_path / "out.txt").read_bytes() == BODY


def test_mirror_base_url_hit(server, tmp_path):
    server.files["/mirror/file.txt"] = BODY
    mirror = server.url("/mirror/")
    fetch(server.url("/canonical/file.txt"), SHA, tmp_path / "f", mirror=mirror, progress=False)
    assert server.requests == [("/mirror/file.txt", None)]
    assert (tmp_path / "f").read_bytes() == BODY


def test_mirror_file_url_hit(server, tmp_path):
    (tmp_path / "file.txt").write_bytes(BODY)
    fetch(server.url("/file.txt"), SHA, tmp_path / "out", mirror=tmp_path.as_uri(), progress=False)
    assert server.requests == [] and (tmp_path / "out").read_bytes() == BODY


@pytest.mark.parametrize("kind", ["dir", "url"])
def test_mirror_miss_falls_back_to_url(server, tmp_path, kind):
    server.files["/canonical/file.txt"] = BODY
    mirror = str(tmp_path) if kind == "dir" else server.url("/mirror")
    fetch(server.url("/canonical/file.txt"), SHA, tmp_path / "out", mirror=mirror, progress=False)
    assert (tmp_path / "out").read_bytes() == BODY
    assert server.requests[-1] == ("/canonical/file.txt", None)


def test_mirror_miss_and_url_failure_names_both(server, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    url = server.url("/file.txt")
    with pytest.raises(DownloadError) as excinfo:
        fetch(url, SHA, tmp_path / "out", mirror=str(mirror), progress=False)
    msg = _one_line_error(excinfo)
    assert msg == f"cannot download {url} (mirror {mirror} has no file.txt): HTTP 404 Not Found"


def test_mirror_with_wrong_bytes_is_a_checksum_error(server, tmp_path):
    (tmp_path / "file.txt").write_bytes(b"tampered")
    dest = tmp_path / "out" / "file.txt"
    with pytest.raises(DownloadError) as excinfo:
        fetch(server.url("/file.txt"), SHA, dest, mirror=str(tmp_path), progress=False)
    msg = _one_line_error(excinfo)
    assert "mirror of" in msg and SHA in msg and _sha(b"tampered") in msg
    _no_leftovers(dest)


def test_llm_mirror_env_is_the_default(server, tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_bytes(BODY)
    monkeypatch.setenv("LLM_MIRROR", str(tmp_path))
    fetch(server.url("/file.txt"), SHA, tmp_path / "out", progress=False)
    assert server.requests == []
    server.files["/file.txt"] = BODY
    fetch(server.url("/file.txt"), SHA, tmp_path / "out2", mirror=None, progress=False)  # None: no mirror
    assert len(server.requests) == 1


def test_local_path_and_file_url_without_hash(tmp_path):
    src = tmp_path / "my corpus.txt"
    src.write_bytes(b"my own text")
    assert fetch(str(src), None, tmp_path / "a.txt", progress=False).read_bytes() == b"my own text"
    assert fetch(src.as_uri(), None, tmp_path / "b.txt", progress=False).read_bytes() == b"my own text"
    src.write_bytes(b"edited")  # without a hash the copy is refreshed on every call
    assert fetch(src, None, tmp_path / "a.txt", progress=False).read_bytes() == b"edited"


def test_missing_local_path(tmp_path):
    with pytest.raises(DownloadError) as excinfo:
        fetch(str(tmp_path / "nope.txt"), None, tmp_path / "out", progress=False)
    assert _one_line_error(excinfo) == f"cannot read {tmp_path / 'nope.txt'}: no such file"


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


ZIP = _zip({"readme": b"about", "SMSSpamCollection": BODY})


def test_fetch_zip_member(server, tmp_path):
    server.files["/static/sms+spam+collection.zip"] = ZIP
    url = server.url("/static/sms+spam+collection.zip")
    dest = tmp_path / "raw" / "SMSSpamCollection.tsv"
    assert fetch_zip_member(url, "SMSSpamCollection", SHA, dest, progress=False) == dest
    assert dest.read_bytes() == BODY
    assert (tmp_path / "raw" / "sms+spam+collection.zip").read_bytes() == ZIP  # cached beside dest
    fetch_zip_member(url, "SMSSpamCollection", SHA, dest, progress=False)  # verified: skipped
    dest.unlink()
    fetch_zip_member(url, "SMSSpamCollection", SHA, dest, progress=False)  # from the cached zip
    assert len(server.requests) == 1 and dest.read_bytes() == BODY


def test_fetch_zip_member_from_mirror(server, tmp_path):
    (tmp_path / "sms+spam+collection.zip").write_bytes(_zip({"SMSSpamCollection": BODY}))
    dest = tmp_path / "out" / "sms.tsv"
    url = server.url("/sms+spam+collection.zip")
    fetch_zip_member(url, "SMSSpamCollection", SHA, dest, mirror=str(tmp_path), progress=False)
    assert server.requests == [] and dest.read_bytes() == BODY


def test_fetch_zip_member_missing_member_lists_members(server, tmp_path):
    server.files["/a.zip"] = ZIP
    dest = tmp_path / "out.tsv"
    with pytest.raises(DownloadError) as excinfo:
        fetch_zip_member(server.url("/a.zip"), "nope", SHA, dest, progress=False)
    msg = _one_line_error(excinfo)
    assert "'nope'" in msg and "members: readme, SMSSpamCollection" in msg
    _no_leftovers(dest)
    assert list(tmp_path.iterdir()) == []  # nor the zip: the stage's output folder holds nothing (it kept a.zip)


def test_fetch_zip_member_hash_mismatch(server, tmp_path):
    server.files["/a.zip"] = ZIP
    dest = tmp_path / "out.tsv"
    wrong = _sha(b"other")
    with pytest.raises(DownloadError) as excinfo:
        fetch_zip_member(server.url("/a.zip"), "SMSSpamCollection", wrong, dest, progress=False)
    msg = _one_line_error(excinfo)
    assert "SMSSpamCollection" in msg and wrong in msg and SHA in msg
    _no_leftovers(dest)
    assert list(tmp_path.iterdir()) == []


def test_fetch_zip_member_corrupt_zip(server, tmp_path):
    server.files["/a.zip"] = b"this is not a zip file"
    with pytest.raises(DownloadError) as excinfo:
        fetch_zip_member(server.url("/a.zip"), "SMSSpamCollection", SHA, tmp_path / "out", progress=False)
    assert "is corrupt" in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_fetch_zip_member_replaces_a_damaged_cache(server, tmp_path):
    server.files["/a.zip"] = ZIP
    (tmp_path / "a.zip").write_bytes(b"truncated")
    fetch_zip_member(server.url("/a.zip"), "SMSSpamCollection", SHA, tmp_path / "out", progress=False)
    assert (tmp_path / "out").read_bytes() == BODY and len(server.requests) == 1


def test_real_source_the_verdict(public_input):
    """sources.yaml's entry, fetched from LLM_MIRROR or the canonical URL, is the book's file."""
    assert sha256_file(public_input("the-verdict")) == VERDICT_SHA


def test_fetch_source_leaves_one_verified_file_that_source_file_finds(server, tmp_path):
    from llm.pipeline.sources import Source

    server.files["/static/sms+spam+collection.zip"] = ZIP
    src = Source(url=server.url("/static/sms+spam+collection.zip"), sha256=SHA, member="SMSSpamCollection")
    path = fetch_source(src, tmp_path / "sms_spam", mirror=None)
    assert [p.name for p in (tmp_path / "sms_spam").iterdir()] == ["SMSSpamCollection"]  # the zip is gone
    assert source_file(tmp_path / "sms_spam", "x") == path and path.read_bytes() == BODY
    with pytest.raises(DownloadError) as excinfo:
        source_file(tmp_path / "nope", "data.corpus entry 'nope'")
    expected = f"data.corpus entry 'nope' is not a source in sources.yaml (no {tmp_path / 'nope'}/)"
    assert _one_line_error(excinfo) == expected


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"sha256": None}, "sources.yaml: corpus.sha256 is missing for {url}: a download must be verified"),
        ({}, "sources.yaml: corpus.sha256 is missing for {url}: a download must be verified"),
        ({"url": "{base}/data.zip", "sha256": SHA}, "sources.yaml: corpus.member is missing for {base}/data.zip: a "
         ".zip URL needs the name of the file inside it"),
        ({"url": "{base}/data.zip", "sha256": SHA, "member": None},
         "sources.yaml: corpus.member is missing for {base}/data.zip"),
    ],
)  # fmt: skip
def test_download_stage_refuses_an_unverifiable_source_before_any_request(server, tmp_path, monkeypatch, entry,
                                                                            message):  # fmt: skip
    """sha256: null on an http(s) source used to download without verification and without a word."""
    from stages import download

    monkeypatch.chdir(tmp_path)
    server.files["/file.txt"] = BODY
    url = server.url("/file.txt")
    source = {"url": url, **{k: v.format(base=server.base) if isinstance(v, str) else v for k, v in entry.items()}}
    Path("sources.yaml").write_text(json.dumps({"corpus": source}))
    with pytest.raises(LLMError) as excinfo:
        download.main("corpus", "sources.yaml")
    assert _one_line_error(excinfo).startswith(message.format(url=url, base=server.base))
    assert server.requests == [] and not Path("data").exists()


def test_a_users_own_local_file_needs_no_sha256(tmp_path, monkeypatch):
    from stages import download

    monkeypatch.chdir(tmp_path)
    Path("mine.txt").write_bytes(BODY)
    for url in ("mine.txt", (tmp_path / "mine.txt").as_uri()):
        Path("sources.yaml").write_text(json.dumps({"corpus": {"url": url, "sha256": None}}))
        assert download.main("corpus", "sources.yaml").read_bytes() == BODY
