"""The full-data download path against a local HTTP server on 127.0.0.1 (tests never reach the network): resume
after a cut connection, a resumed request for the missing bytes only, backoff, wrong ranges, stale parts, HTML and
short bodies, checksum mismatch (given or recorded), offline; and encode_file."""

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from minijamba import data
from minijamba.download import FILES, DownloadError, check_downloaded, download, download_tinystories

BODY = "".join(
    f"Story {i}: Tom and Sue went to the park. They saw a big dog.\n{data.EOT}\n" for i in range(300)
).encode()


def _free_port():
    with socket.socket() as sock:  # a port nothing listens on: connection refused, as offline
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OFFLINE_URL = f"http://127.0.0.1:{_free_port()}/x.txt"


def no_wait(seconds):
    raise AssertionError(f"a wait of {seconds} s where the download needed no retry")


class Server:
    """Serves `body` at any path, honours `Range: bytes=N-` (206; 416 past the end), and cuts the first `cuts`
    responses mid-file. Misbehaviours on request: no Content-Length (`length=False`), a 206 whose Content-Range starts
    at 0 whatever was asked (`wrong_range`), the first `busy` requests answered 503, another Content-Type."""

    def __init__(self, cuts=0, body=BODY, length=True, wrong_range=False, busy=0, content_type="text/plain"):
        self.cuts, self.busy, self.ranges = cuts, busy, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = int(self.headers.get("Range", "bytes=0-")[len("bytes=") :].rstrip("-"))
                server.ranges.append(start)
                if server.busy:
                    server.busy -= 1
                    self.send_error(503)
                    return
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                sent = 0 if wrong_range else start
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body) - sent))
                if start:
                    self.send_header("Content-Range", f"bytes {sent}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if server.cuts:  # send half of what was promised, then drop the connection
                    server.cuts -= 1
                    self.wfile.write(body[sent : sent + (len(body) - sent) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[sent:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(**kwargs):
        servers.append(Server(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_download_resumes_after_a_cut_connection_and_backs_off(server, tmp_path):
    s = server(cuts=2)
    sha = hashlib.sha256(BODY).hexdigest()
    waits = []
    path = download(s.url + "valid.txt", tmp_path / "valid.txt", sha256=sha, progress=False, sleep=waits.append)
    assert path.read_bytes() == BODY and not (tmp_path / "valid.txt.part").exists()
    half = len(BODY) // 2
    assert s.ranges == [0, half, half + (len(BODY) - half) // 2]  # each retry asks only for the missing bytes
    assert waits == [1.0, 2.0]  # not instantly: a wait that doubles


def test_retries_wait_longer_each_time_up_to_a_cap(server, tmp_path):
    waits = []
    with pytest.raises(DownloadError, match="10 tries"):
        download(OFFLINE_URL, tmp_path / "x.txt", retries=10, timeout=2, progress=False, sleep=waits.append)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    s = server(busy=2)  # 503 twice: retried after a wait, not an error
    waits.clear()
    assert download(s.url + "x", tmp_path / "x.txt", progress=False, sleep=waits.append).read_bytes() == BODY
    assert waits == [1, 2]


def test_a_206_with_the_wrong_content_range_starts_again_from_byte_0(server, tmp_path):
    (tmp_path / "x.txt.part").write_bytes(BODY[:100])
    s = server(wrong_range=True)  # answers `Range: bytes=100-` with bytes 0-...: appending them would corrupt the file
    waits = []
    assert download(s.url + "x", tmp_path / "x.txt", progress=False, sleep=waits.append).read_bytes() == BODY
    assert s.ranges == [100, 0] and waits == []  # restarted at once: the server answered, nothing to wait for


def test_a_stale_part_longer_than_the_file_is_discarded_and_a_complete_one_kept(server, tmp_path):
    s = server()
    (tmp_path / "x.txt.part").write_bytes(BODY + b"stale tail")  # 416: past the end
    assert download(s.url + "x", tmp_path / "x.txt", progress=False, sleep=no_wait).read_bytes() == BODY
    assert s.ranges == [len(BODY) + 10, 0]
    (tmp_path / "y.txt.part").write_bytes(BODY)  # 416 at exactly the end: complete, nothing to fetch
    assert download(s.url + "y", tmp_path / "y.txt", progress=False, sleep=no_wait).read_bytes() == BODY
    assert s.ranges[2:] == [len(BODY)]


@pytest.mark.parametrize(
    ("kwargs", "min_size", "message"),
    [
        ({"content_type": "text/html"}, 1, "HTML page"),
        ({"body": b"<!DOCTYPE html><p>gone</p>", "content_type": "application/octet-stream"}, 1, "HTML page"),
        ({"body": b"Entry not found, sorry...\n"}, 1000, "26 bytes, but the file has at least 1000"),
    ],
)
def test_an_html_page_or_a_short_body_is_an_error_naming_the_url(server, tmp_path, kwargs, min_size, message):
    s = server(**kwargs)
    with pytest.raises(DownloadError, match=f"{s.url}x: .*{message}"):
        download(s.url + "x", tmp_path / "x.txt", min_size=min_size, progress=False, sleep=no_wait)
    assert not list(tmp_path.iterdir())  # no file, no .part, no recorded checksum


def test_a_body_cut_short_without_content_length_is_caught_by_the_recorded_sha256(server, tmp_path):
    """No Content-Length: a connection closed early looks like the end of the file. The first download records its
    sha256, so a later one that is cut short is refused (and the min_size catches it when it is far too short)."""
    dest = tmp_path / "x.txt"
    download(server(length=False).url + "x", dest, progress=False, sleep=no_wait)
    assert (tmp_path / "x.txt.sha256").read_text() == f"{hashlib.sha256(BODY).hexdigest()}  x.txt\n"
    dest.unlink()
    cut = server(length=False, cuts=1).url + "x"
    with pytest.raises(DownloadError, match=r"does not match the recorded in .*x.txt.sha256"):
        download(cut, dest, progress=False, sleep=no_wait)
    assert not dest.exists() and not (tmp_path / "x.txt.part").exists()
    with pytest.raises(DownloadError, match="at least"):
        cut = server(length=False, cuts=1).url + "x"
        download(cut, tmp_path / "y.txt", min_size=len(BODY), progress=False, sleep=no_wait)


def test_a_checksum_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    s = server()
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download(s.url + "train.txt", tmp_path / "train.txt", sha256="0" * 64, progress=False)
    assert not list(tmp_path.iterdir())


def test_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="No network.*bundled"):
        download(OFFLINE_URL, tmp_path / "x.txt", retries=2, timeout=2, progress=False, sleep=lambda seconds: None)


def test_download_tinystories_then_train_data_reads_it(server, tmp_path):
    s = server(cuts=1)
    files = {name: (remote, None, 1000) for name, (remote, _, _) in FILES.items()}
    with pytest.raises(FileNotFoundError, match="make data-full"):
        check_downloaded(tmp_path)
    download_tinystories(tmp_path, base_url=s.url, files=files, progress=False)
    check_downloaded(tmp_path)
    assert len(data.split_stories(data.read_text("train", tmp_path))) == 300
    download_tinystories(tmp_path, base_url=s.url, files=files, progress=False)  # kept: its sha256 is the recorded one
    with open(tmp_path / "train.txt", "r+b") as f:
        f.write(b"X")  # damaged after the download
    with pytest.raises(DownloadError, match="train.txt: sha256 .* damaged; delete it"):
        download_tinystories(tmp_path, base_url=s.url, files=files, progress=False)


def test_encode_file_matches_encode_stories(tmp_path):
    """The blockwise, memory-mapped encoding of a big file equals encoding its stories in memory."""
    (tmp_path / "train.txt").write_bytes(BODY)
    stories = data.split_stories(BODY.decode())
    tokenizer = data.train_tokenizer(stories, 300)
    stream = data.encode_file(tokenizer, tmp_path / "train.txt", block_chars=1000)  # many blocks, cut mid-story
    np.testing.assert_array_equal(stream, data.encode_stories(tokenizer, stories))
    assert np.array_equal(data.encode_file(tokenizer, tmp_path / "train.txt"), stream)  # the cache is reused
