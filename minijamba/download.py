"""Download the full TinyStories dataset where there is a network: `python -m minijamba.download` (`make data-full`).

The official files on the Hugging Face hub (roneneldan/TinyStories, CDLA-Sharing-1.0):
    TinyStoriesV2-GPT4-train.txt   about 2 GB       -> <dir>/train.txt
    TinyStoriesV2-GPT4-valid.txt   tens of MB       -> <dir>/valid.txt
in the same format as the bundled cut (stories separated by `<|endoftext|>` lines), so data.read_text reads them and
`python -m minijamba.train --data full` trains on them (the tokenizer on the first train.TOKENIZER_CHARS characters).

A download goes to <file>.part and is renamed only once complete and checked, so an interrupted one never looks
done. Run it again to resume: the request asks for the missing bytes only (HTTP Range), and a connection cut
mid-file is retried the same way. Checks:
    size     the bytes received must add up to the server's Content-Length (always checked)
    sha256   only where one is known: FILES has None for the official files, because these machines cannot reach the
             hub to measure them and a made-up checksum would be worse than none. Pass sha256= to download() (or
             fill FILES) once you have measured them on a machine with a network.
Offline, the error says so, and that the bundled data (the default, `--data bundled`) needs no network.
"""

import argparse
import hashlib
import http.client
import os
import sys
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

__all__ = ["DEFAULT_DIR", "HUB_URL", "FILES", "DownloadError", "download", "download_tinystories", "check_downloaded"]

DEFAULT_DIR = Path(os.environ.get("MINIJAMBA_DATA", "~/.cache/minijamba/tinystories")).expanduser()
HUB_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
FILES = {  # our name: (the file on the hub, its sha256 or None when not known)
    "train.txt": ("TinyStoriesV2-GPT4-train.txt", None),
    "valid.txt": ("TinyStoriesV2-GPT4-valid.txt", None),
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed for good: offline, refused, wrong size, or a checksum that does not match."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _fetch(url, part, timeout, progress):
    """Append the bytes `part` lacks (a Range request); returns the full size the server announced, or None."""
    have = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(request, timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is complete (checked by the caller)
            return have
        raise
    with response:
        if response.status == 200 and have:  # the server ignores ranges: start again from byte 0
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress) as bar,
        ):
            while block := response.read(CHUNK):  # a cut connection raises IncompleteRead here
                f.write(block)
                bar.update(len(block))
    return total


def download(url, dest, sha256=None, retries=5, timeout=60, progress=True):
    """Download `url` to `dest` (resuming <dest>.part), check its size and, when given, its sha256."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for _ in range(retries):
        try:
            total = _fetch(url, part, timeout, progress)
        except HTTPError as e:
            raise DownloadError(f"{url}: the server answered {e.code} {e.reason}") from e
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
    if sha256 is not None and (actual := _sha256(part)) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 {actual} does not match the expected {sha256}; the file was deleted")
    # Not checkpoint.atomic_write, which deletes its temp file on failure: the .part must survive one, to be resumed.
    os.replace(part, dest)
    return dest


def download_tinystories(directory=DEFAULT_DIR, base_url=HUB_URL, files=FILES, progress=True):
    """Both official files into `directory` as train.txt and valid.txt (a file already there is kept)."""
    directory = Path(directory)
    for name, (remote, sha256) in files.items():
        if not (directory / name).exists():
            download(base_url + remote, directory / name, sha256=sha256, progress=progress)
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
