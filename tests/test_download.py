"""The full-data download path against a local HTTP server on 127.0.0.1 (tests never reach the network): resume
after a cut connection, a resumed request for the missing bytes only, checksum mismatch, offline; and encode_file."""

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from minijamba import data
from minijamba.download import DownloadError, check_downloaded, download, download_tinystories

BODY = "".join(
    f"Story {i}: Tom and Sue went to the park. They saw a big dog.\n{data.EOT}\n" for i in range(300)
).encode()


class Server:
    """Serves BODY at any path, honours `Range: bytes=N-` (206), and cuts the first `cuts` responses mid-file."""

    def __init__(self, cuts=0):
        self.cuts, self.ranges = cuts, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = int(self.headers.get("Range", "bytes=0-")[len("bytes=") :].rstrip("-"))
                server.ranges.append(start)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(BODY) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                self.end_headers()
                if server.cuts:  # send half of what was promised, then drop the connection
                    server.cuts -= 1
                    self.wfile.write(BODY[start : start + (len(BODY) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(BODY[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(cuts=0):
        servers.append(Server(cuts))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_download_resumes_after_a_cut_connection(server, tmp_path):
    s = server(cuts=2)
    sha = hashlib.sha256(BODY).hexdigest()
    path = download(s.url + "valid.txt", tmp_path / "valid.txt", sha256=sha, progress=False)
    assert path.read_bytes() == BODY and not (tmp_path / "valid.txt.part").exists()
    half = len(BODY) // 2
    assert s.ranges == [0, half, half + (len(BODY) - half) // 2]  # each retry asks only for the missing bytes


def test_a_checksum_mismatch_is_an_error_and_leaves_no_file(server, tmp_path):
    s = server()
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download(s.url + "train.txt", tmp_path / "train.txt", sha256="0" * 64, progress=False)
    assert not list(tmp_path.iterdir())


def test_offline_is_a_clear_error_that_keeps_the_partial_file(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: connection refused, as offline
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="No network.*bundled"):
        download(f"http://127.0.0.1:{port}/x.txt", tmp_path / "x.txt", retries=2, timeout=2, progress=False)


def test_download_tinystories_then_train_data_reads_it(server, tmp_path):
    s = server(cuts=1)
    files = {"train.txt": ("TinyStoriesV2-GPT4-train.txt", None), "valid.txt": ("TinyStoriesV2-GPT4-valid.txt", None)}
    with pytest.raises(FileNotFoundError, match="make data-full"):
        check_downloaded(tmp_path)
    download_tinystories(tmp_path, base_url=s.url, files=files, progress=False)
    check_downloaded(tmp_path)
    assert len(data.split_stories(data.read_text("train", tmp_path))) == 300


def test_encode_file_matches_encode_stories(tmp_path):
    """The blockwise, memory-mapped encoding of a big file equals encoding its stories in memory."""
    (tmp_path / "train.txt").write_bytes(BODY)
    stories = data.split_stories(BODY.decode())
    tokenizer = data.train_tokenizer(stories, 300)
    stream = data.encode_file(tokenizer, tmp_path / "train.txt", block_chars=1000)  # many blocks, cut mid-story
    np.testing.assert_array_equal(stream, data.encode_stories(tokenizer, stories))
    assert np.array_equal(data.encode_file(tokenizer, tmp_path / "train.txt"), stream)  # the cache is reused
