"""Download the full TinyStories dataset where there is a network: `python -m minijamba.download` (`make data-full`).

The official files on the Hugging Face hub (roneneldan/TinyStories, CDLA-Sharing-1.0):
    TinyStoriesV2-GPT4-train.txt   about 2 GB       -> <dir>/train.txt
    TinyStoriesV2-GPT4-valid.txt   tens of MB       -> <dir>/valid.txt
in the same format as the bundled cut (stories separated by `<|endoftext|>` lines), so data.read_text reads them and
`python -m minijamba.train --data full` trains on them (the tokenizer on the first train.TOKENIZER_CHARS characters).

A download goes to <file>.part and is renamed only once complete and checked, so an interrupted one never looks
done. Run it again to resume: the request asks for the missing bytes only (HTTP Range), and a connection cut
mid-file is retried the same way, after a wait that doubles each time (1 s, 2 s, 4 s ... at most 60 s). Checks:
    range    a 206 answer must say (Content-Range) it starts where the .part ends, or the .part is discarded and the
             download starts again from byte 0; so is a .part the server calls past the end (416)
    size     the bytes received must add up to what the server announced (Content-Length, Content-Range), and at
             least the file's minimum size in FILES: a server that sends no length and closes early, or a 26-byte
             error page, is caught here
    html     an answer that is an HTML page (Content-Type, or a body starting `<!doctype` or `<html`) is an error
    sha256   FILES has None for the official files, because these machines cannot reach the hub to measure them and
             a made-up checksum would be worse than none. So the first complete download's sha256 is recorded in
             <file>.sha256 and every later download of that file into that folder must match it; pass sha256= to
             download() (or fill FILES) once you have measured them, to check the first one too.
Offline, the error says so, and that the bundled data (the default, `--data bundled`) needs no network.
"""

import argparse
import hashlib
import http.client
import os
import re
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from .checkpoint import atomic_write

__all__ = ["DEFAULT_DIR", "HUB_URL", "FILES", "DownloadError", "download", "download_tinystories", "check_downloaded"]

DEFAULT_DIR = Path(os.environ.get("MINIJAMBA_DATA", "~/.cache/minijamba/tinystories")).expanduser()
HUB_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
FILES = {  # our name: (the file on the hub, its sha256 or None when not known, a size it surely exceeds in bytes)
    "train.txt": ("TinyStoriesV2-GPT4-train.txt", None, 10**9),  # about 2 GB
    "valid.txt": ("TinyStoriesV2-GPT4-valid.txt", None, 10**7),  # tens of MB
}
CHUNK = 1 << 20
MAX_WAIT = 60.0  # seconds: the longest wait between two tries


class DownloadError(RuntimeError):
    """A download that failed for good: offline, refused, wrong size, or a checksum that does not match."""


class _Restart(Exception):
    """The .part cannot be resumed (the server's range does not fit it): discard it and start from byte 0."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _content_range(header):
    """'bytes 10-99/100' -> (10, 99, 100); the total is None for '*'; None for a header that is not of this form."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (header or "").strip())
    if match is None:
        return None
    start, end, total = match.groups()
    return int(start), int(end), None if total == "*" else int(total)


def _looks_html(head):
    """Whether the first bytes of a body are an HTML page (an error or login page served in place of the file)."""
    return head[:64].lstrip().lower().startswith((b"<!doctype", b"<html"))


def _fetch(url, part, timeout, progress):
    """Append the bytes `part` lacks (a Range request); returns the full size the server announced, or None."""
    have = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(request, timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # the .part reaches the end, or (stale) lies past it: 'bytes */<size>' says which
            total = re.fullmatch(r"bytes \*/(\d+)", (e.headers.get("Content-Range") or "").strip())
            if total is not None and int(total.group(1)) == have:
                return have
            raise _Restart(f"the server says {part.name} ({have} bytes) lies past the end of the file") from e
        raise
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if response.status == 206:
            span = _content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != have or (length is not None and span[1] - span[0] + 1 != length):
                raise _Restart(f"asked for bytes {have}-, the server sent Content-Range {span}")
            total = span[2]
        else:  # 200: the whole file, even when a range was asked (a server that ignores ranges): start from byte 0
            have = 0
            total = length
        block = response.read(CHUNK)
        if "html" in response.headers.get("Content-Type", "") or (not have and _looks_html(block)):
            raise DownloadError(f"{url}: the server sent an HTML page, not the file (is the address right?)")
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress) as bar,
        ):
            while block:
                f.write(block)
                bar.update(len(block))
                block = response.read(CHUNK)  # a cut connection raises IncompleteRead here, when a length was sent
    return total


def download(url, dest, sha256=None, min_size=1, retries=5, timeout=60, progress=True, wait=1.0, sleep=time.sleep):
    """Download `url` to `dest` (resuming <dest>.part), check its size (as announced, and >= min_size bytes) and its
    sha256: the given one, else the one recorded in <dest>.sha256 by an earlier download, which is written now if
    absent. Failed tries are retried after wait, 2 wait, 4 wait ... seconds (at most MAX_WAIT), slept by `sleep`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    recorded = dest.with_name(dest.name + ".sha256")
    known = "expected"
    if sha256 is None and recorded.is_file():
        sha256, known = recorded.read_text().split()[0], f"recorded in {recorded} (delete it if the file changed)"
    error = None
    for attempt in range(retries):
        if attempt and not isinstance(error, _Restart):  # a restart needs no wait: the server answered
            sleep(min(wait * 2 ** (attempt - 1), MAX_WAIT))
        try:
            total = _fetch(url, part, timeout, progress)
        except HTTPError as e:
            if e.code >= 500 or e.code == 429:  # busy or failing for now: worth another try, after the wait
                error = e
                continue
            raise DownloadError(f"{url}: the server answered {e.code} {e.reason}") from e
        except _Restart as e:
            part.unlink()
            error = e
            continue
        except (URLError, OSError, http.client.HTTPException) as e:  # offline, refused, cut mid-file, timed out
            error = e
            continue
        size = part.stat().st_size
        if total is None or size == total:
            break
        error = DownloadError(f"received {size} bytes of {total}")
    else:
        raise DownloadError(
            f"could not download {url} ({retries} tries; last: {error}). No network? The bundled TinyStories "
            f"(`--data bundled`, the default) needs none; rerun this to resume the {part.name} kept so far."
        ) from error
    if size < min_size:
        part.unlink()
        raise DownloadError(f"{url}: {size} bytes, but the file has at least {min_size}: not the file; deleted it")
    actual = _sha256(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 {actual} does not match the {known} {sha256}; the file was deleted")
    if not recorded.is_file():
        atomic_write(recorded, lambda tmp: tmp.write_text(f"{actual}  {dest.name}\n"))  # `sha256sum -c` reads it
    # Not checkpoint.atomic_write, which deletes its temp file on failure: the .part must survive one, to be resumed.
    os.replace(part, dest)
    return dest


def download_tinystories(directory=DEFAULT_DIR, base_url=HUB_URL, files=FILES, progress=True):
    """Both official files into `directory` as train.txt and valid.txt. A file already there is kept, once checked
    against its sha256 (the known one, else the one its download recorded)."""
    directory = Path(directory)
    for name, (remote, sha256, min_size) in files.items():
        dest, recorded = directory / name, directory / f"{name}.sha256"
        if not dest.exists():
            download(base_url + remote, dest, sha256=sha256, min_size=min_size, progress=progress)
            continue
        expected = sha256 or (recorded.read_text().split()[0] if recorded.is_file() else None)
        if expected is not None and (actual := _sha256(dest)) != expected:
            raise DownloadError(
                f"{dest}: sha256 {actual} is not the {expected} of its download: damaged; delete it and rerun this"
            )
    return directory


def check_downloaded(directory):
    """Raise FileNotFoundError naming what is missing and how to get it, before any training work."""
    missing = [name for name in FILES if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--data full: {', '.join(missing)} not in {str(directory)!r}; run `make data-full` "
            f"(python -m minijamba.download --dir {directory}) on a machine with a network"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"where to put the files ({DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        print(f"TinyStories (CDLA-Sharing-1.0) into {download_tinystories(args.dir)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
