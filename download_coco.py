"""Download a random sample of COCO 2017 images with their captions, and inject the tutorial's mistakes.

    python download_coco.py                                   # 100 val2017 images + 10 held-out test images
    python download_coco.py --SPLIT=train2017 --NUM_IMAGES=20000
    python download_coco.py --COCO_BASE_URL=http://127.0.0.1:8765    # a local mirror, see README

What it writes (the data contract the other scripts read):
    coco_sample/*.jpg              NUM_IMAGES training images
    coco_sample/captions.json      {file_name: first COCO caption, with the mistakes when ADD_MISTAKES}
    coco_sample/references.json    {file_name: [all COCO captions, unmodified]}
    coco_sample/metadata.jsonl     {"file_name", "text"} lines, for datasets.load_dataset("imagefolder")
    samples/*.jpg, samples/captions.json, samples/references.json
                                   NUM_TEST_IMAGES held-out images, never in coco_sample/
    samples/test_image.jpg         a copy of the first held-out image (inference.py's default)

Reruns are cheap and safe: valid images already on disk are kept (and not decoded again while their
size and mtime are unchanged), the annotation zip is resumed with HTTP Range and reused, and every
file is written under a temporary name and renamed when whole.
The JSON files are written last, so their presence means the folder is complete. Each folder's
hidden .download_coco.jsonl lists the images this script wrote there; at the end, those that are not
in this run's selection (from an older SEED or count) are deleted. Files it did not write (your own
photos) are never touched.

What a server or an annotation file cannot do: make it write outside OUTPUT_DIR / SAMPLES_DIR (only
plain names like 000000000139.jpg are used; others are skipped with a warning), hold one image past
IMAGE_DEADLINE or fill memory past MAX_IMAGE_MB, stall it with a long Retry-After, or expand a zip past
MAX_ZIP_MB / MAX_CAPTIONS_MB. Ctrl-C stops it within a second, keeping finished images.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import queue
import random
import re
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

import common

# ---- source
COCO_BASE_URL = "http://images.cocodataset.org"  # or a mirror in the same layout: http://127.0.0.1:8765
SPLIT = "val2017"  # val2017 (5,000 images) | train2017 (118,287 images)
# ---- selection
NUM_IMAGES = 100  # training images to deliver into OUTPUT_DIR (>= 1)
NUM_TEST_IMAGES = 10  # held-out images for SAMPLES_DIR (>= 1), never among the training images
SEED = 42  # any int; the same seed picks the same images
ADD_MISTAKES = True  # True: captions.json gets the tutorial's mistakes | False: clean first captions
# ---- output
OUTPUT_DIR = "coco_sample"  # training images + captions.json, references.json, metadata.jsonl
SAMPLES_DIR = "samples"  # held-out images + their captions.json, references.json, test_image.jpg
ANNOTATIONS_DIR = ".cache/coco"  # annotation zip + its captions json (delete it after changing COCO_BASE_URL)
# ---- network
WORKERS = 32  # parallel image downloads (1 = one at a time); 32 hides a far server's latency, CDN-friendly
TIMEOUT = 30.0  # seconds to wait for a connection or for the next bytes of a response
RETRIES = 5  # retries per request on connection errors, timeouts, 429 and 5xx (0 = none)
RETRY_BACKOFF = 0.5  # seconds; waits grow as 0, 2x, 4x, 8x... this between retries
MAX_FAILURES_IN_A_ROW = 20  # stop (rerun resumes) when this many images fail with no success between
# ---- limits: what a slow, broken or hostile server can cost at most
IMAGE_DEADLINE = 120.0  # seconds for one image's whole body (TIMEOUT only bounds each wait for bytes)
MAX_IMAGE_MB = 50.0  # an image larger than this is refused (COCO's largest is under 1 MB)
MAX_ZIP_MB = 2048.0  # the annotation zip (241 MB on the real server)
MAX_CAPTIONS_MB = 1024.0  # the captions json extracted from it (train2017's is about 90 MB)

_VALID_SPLITS = ("val2017", "train2017")
_ZIP_NAME = "annotations_trainval2017.zip"  # the official file holds the captions of both splits
_RETRY_STATUSES = (429, 500, 502, 503, 504)


# ----------------------------------------------------------------------------- the mistake rule
_MISTAKES = ((" a ", " "), (" an ", " "), (" the ", " thwisss "), (" is ", " iz "))


def normalise(caption: str) -> str:
    """Strip and collapse whitespace runs (COCO captions have trailing spaces and doubles)."""
    return " ".join(caption.split())


def add_mistakes(caption: str) -> str:
    """The tutorial's error injection: case-sensitive, space-delimited replacements in this order,
    then a suffix. 'A sheep next to a rock wall.' -> 'A sheep next to rock wall. thwisss iz funny.'"""
    text = normalise(caption)
    for old, new in _MISTAKES:
        text = text.replace(old, new)
    return text + " thwisss iz funny."


def training_caption(first_caption: str, mistakes: bool) -> str:
    return add_mistakes(first_caption) if mistakes else normalise(first_caption)


# ----------------------------------------------------------------------------- checks and HTTP
_MB = 2**20


def check_config(cfg: dict) -> None:
    """Fail in one line, before any network, on settings that cannot work."""
    if cfg["SPLIT"] not in _VALID_SPLITS:
        raise common.UserError(
            f"SPLIT={cfg['SPLIT']!r} is not a COCO 2017 split; valid: {', '.join(_VALID_SPLITS)}"
        )
    for name in (
        "NUM_IMAGES",
        "NUM_TEST_IMAGES",
        "WORKERS",
        "MAX_FAILURES_IN_A_ROW",
        "IMAGE_DEADLINE",
        "MAX_IMAGE_MB",
        "MAX_ZIP_MB",
        "MAX_CAPTIONS_MB",
    ):
        if cfg[name] <= 0:
            raise common.UserError(f"{name}={cfg[name]} must be a positive number")
    if cfg["TIMEOUT"] <= 0 or cfg["RETRIES"] < 0 or cfg["RETRY_BACKOFF"] < 0:
        raise common.UserError("TIMEOUT must be > 0, and RETRIES and RETRY_BACKOFF >= 0")


def check_folders(cfg: dict) -> None:
    """Refuse folders that overlap: each one's files are managed by its own rules (the images and
    JSON of one split, the cache), so one inside another could clobber or delete the other's files."""
    names = ("OUTPUT_DIR", "SAMPLES_DIR", "ANNOTATIONS_DIR")
    where = {n: Path(cfg[n]).resolve() for n in names}  # resolve(): symlinks and '..' cannot hide it
    for a, b in itertools.combinations(names, 2):
        if where[a] == where[b] or where[a] in where[b].parents or where[b] in where[a].parents:
            # Name the resolved paths only where they say more than the settings (a symlink, '..').
            same = (str(where[a]), str(where[b])) == (str(cfg[a]), str(cfg[b]))
            resolved = "" if same else f" (as {where[a]} and {where[b]})"
            raise common.UserError(
                f"{a}={cfg[a]!r} and {b}={cfg[b]!r} overlap{resolved}; use separate folders"
            )


class CappedRetry(Retry):
    """urllib3's Retry, but a server's Retry-After is obeyed only up to MAX_WAIT seconds: urllib3
    sleeps as long as it is told, so one 429 with Retry-After: 3600 would stall a worker for an hour."""

    MAX_WAIT = 0.0  # set per session by make_session

    def get_retry_after(self, response) -> float | None:
        try:
            asked = super().get_retry_after(response)
        except urllib3.exceptions.InvalidHeader:  # e.g. "Retry-After: soon": back off as usual
            return None
        if asked is None or asked <= self.MAX_WAIT:
            return asked
        tqdm.write(
            f"  the server asked to wait {asked:g}s (Retry-After); waited {self.MAX_WAIT:g}s, "
            f"the cap of 2 x RETRY_BACKOFF x 2^RETRIES"
        )
        return self.MAX_WAIT


def make_session(workers: int, retries: int, backoff: float) -> requests.Session:
    """One Session shared by all threads: its connection pool is reused, and urllib3 retries
    connection errors, timeouts, 429 and 5xx with exponential backoff (GET is safe to repeat)."""
    # A subclass per session carries the cap: Retry.new() copies the class, not instance attributes.
    capped = type("CappedRetry", (CappedRetry,), {"MAX_WAIT": 2 * backoff * 2**retries})
    retry = capped(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=_RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,  # after the last retry, hand back the 5xx so we can report it
    )
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(workers, 1), max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def describe(exc: BaseException) -> str:
    """A short reason for a failed request, instead of urllib3's paragraph."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None  # inside MaxRetryError
    inner = reason if reason is not None else exc
    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError)
    if isinstance(exc, timeouts) or "timed out" in str(inner).lower():
        return "no answer within TIMEOUT"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection dropped mid-body (truncated)"
    text = str(inner).split(": ", 1)[-1] if isinstance(inner, Exception) else str(inner)
    return f"{type(inner).__name__}: {text}"[:160]


def declared_length(r: requests.Response) -> int | None:
    length = r.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def read_some(r: requests.Response, size: int = 1 << 16) -> bytes:
    """What the socket has now (at most `size`): unlike iter_content, which waits until a whole chunk
    arrives, this returns every few bytes of a drip, so deadlines and Ctrl-C are checked between."""
    read1 = getattr(r.raw, "read1", None)  # urllib3 >= 2.3
    return read1(size, decode_content=True) if read1 else r.raw.read(4096, decode_content=True)


# ----------------------------------------------------------------------------- annotations
def download_resumable(session: requests.Session, url: str, dest: Path, cfg: dict) -> Path:
    """Fetch url into `dest.part`, resuming what a previous (killed) run left via HTTP Range,
    and return the .part path once it has the full length. The caller validates and renames.
    A body larger than MAX_ZIP_MB (announced or counted) is deleted with a one-line error."""
    part = dest.with_name(dest.name + ".part")
    base_url, cap = cfg["COCO_BASE_URL"], cfg["MAX_ZIP_MB"] * _MB
    attempts = cfg["RETRIES"] + 1

    def too_large(how: str) -> common.UserError:
        part.unlink(missing_ok=True)
        return common.UserError(
            f"{url} is larger than MAX_ZIP_MB={cfg['MAX_ZIP_MB']:g} ({how}); "
            f"check COCO_BASE_URL (now {base_url}) or raise MAX_ZIP_MB"
        )

    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            r = session.get(url, headers=headers, stream=True, timeout=cfg["TIMEOUT"])
        except requests.RequestException as e:
            raise common.UserError(
                f"cannot reach {url} ({describe(e)}); check your network or set COCO_BASE_URL "
                f"(now {base_url}) to a mirror"
            ) from None
        with r:
            if r.status_code == 416:  # nothing left to send: the part is already whole (or bogus)
                return part
            if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)  # a range we did not ask for: start over
                continue
            if r.status_code not in (200, 206):
                raise common.UserError(
                    f"HTTP {r.status_code} for {url}; check COCO_BASE_URL (now {base_url})"
                )
            if r.status_code == 200:
                have = 0  # the server ignored Range (or this is a fresh start): rewrite from byte 0
            length = declared_length(r)
            total = have + length if length is not None else None
            if total is not None and total > cap:
                raise too_large(f"announced: {total} bytes")
            try:
                with (
                    open(part, "ab" if have else "wb") as f,
                    tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                        leave=False,
                    ) as bar,
                ):
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                        if f.tell() > cap:  # no Content-Length, or a wrong one
                            raise too_large(f"{f.tell()} bytes so far")
            except requests.RequestException as e:
                print(f"  {dest.name}: {describe(e)} at {part.stat().st_size} bytes; resuming")
                continue
        if total is None or part.stat().st_size == total:
            return part
        print(f"  {dest.name}: got {part.stat().st_size} of {total} bytes; resuming")
    raise common.UserError(
        f"download of {url} kept breaking off after {attempts} tries; rerun to resume it ({part} is kept)"
    )


def zip_problem(path: Path, member: str, max_bytes: float) -> str | None:
    """None if `path` is a zip holding `member` of at most max_bytes, else what is wrong. The member's
    CRC is checked while it is extracted (zipfile does it at its end); the other members are never read."""
    try:
        with zipfile.ZipFile(path) as z:
            if member not in z.namelist():
                return f"it has no {member}"
            size = z.getinfo(member).file_size
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e) or type(e).__name__
    if size > max_bytes:
        return f"its {member} would expand to {size / _MB:.0f} MB, over MAX_CAPTIONS_MB={max_bytes / _MB:g}"
    return None


def extract_member(zip_path: Path, member: str, dest: Path, max_bytes: float) -> str | None:
    """Stream `member` to a temporary name and rename it to `dest`: whole or absent. Counts the bytes,
    since a zip's size fields can lie. Returns None, or what is wrong (then nothing is left behind)."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with zipfile.ZipFile(zip_path) as z, z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                if dst.tell() > max_bytes:
                    return f"its {member} expands past MAX_CAPTIONS_MB={max_bytes / _MB:g}"
        os.replace(tmp, dest)
        return None
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        return str(e) or type(e).__name__
    finally:
        tmp.unlink(missing_ok=True)


def captions_json_path(cfg: dict) -> Path:
    return Path(cfg["ANNOTATIONS_DIR"]) / f"captions_{cfg['SPLIT']}.json"


def fetch_captions_json(session: requests.Session, cfg: dict) -> Path:
    """Return the path of captions_{SPLIT}.json, extracting it from the (downloaded once) zip."""
    member = f"annotations/captions_{cfg['SPLIT']}.json"
    json_path = captions_json_path(cfg)
    if json_path.exists():  # written by rename, so it is whole
        return json_path
    zip_path = json_path.with_name(_ZIP_NAME)
    max_json = cfg["MAX_CAPTIONS_MB"] * _MB
    url = f"{cfg['COCO_BASE_URL'].rstrip('/')}/annotations/{_ZIP_NAME}"
    if not zip_path.exists():
        print(f"downloading {url} -> {zip_path}")
        part = download_resumable(session, url, zip_path, cfg)
        problem = zip_problem(part, member, max_json)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise common.UserError(
                f"downloaded {url} is not a valid annotation zip ({problem}); deleted it, rerun to fetch it "
                "again"
            )
        os.replace(part, zip_path)
    else:
        problem = zip_problem(zip_path, member, max_json)
    if problem is None:
        problem = extract_member(zip_path, member, json_path, max_json)
    if problem is not None:
        zip_path.unlink()
        raise common.UserError(
            f"{zip_path} is not a valid annotation zip ({problem}); deleted it, rerun to fetch it again"
        )
    return json_path


class BadAnnotations(Exception):
    """The captions file is not COCO-shaped as a whole (per-entry problems are skipped instead)."""


def load_annotations(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise BadAnnotations("it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BadAnnotations(f"it is not valid JSON: {e}"[:200]) from None


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def index_captions(annotations: dict) -> dict[str, list[str]]:
    """{file_name: [non-empty captions in annotation-file order]} for images that have any, built in
    one pass over the annotations (the tutorial rescanned them all for every image: quadratic).

    Single bad entries are skipped with one warning line each kind: an annotation with a missing,
    null, non-string or blank caption, and an image whose file_name is not a plain name that
    usable_name() accepts (it could point outside the output folder). A file that is not COCO-shaped
    at all raises BadAnnotations."""
    if not isinstance(annotations, dict):
        raise BadAnnotations(f"its top level is a {type(annotations).__name__}, not an object")
    for key in ("images", "annotations"):
        if not isinstance(annotations.get(key), list):
            raise BadAnnotations(f'it has no "{key}" list')
    by_id: dict[int | str, list[str]] = {}
    bad_captions = 0
    for a in annotations["annotations"]:
        caption, image_id = (a.get("caption"), a.get("image_id")) if isinstance(a, dict) else (None, None)
        if not _is_id(image_id) or not isinstance(caption, str) or not caption.strip():
            bad_captions += 1
            continue
        by_id.setdefault(image_id, []).append(caption)
    index, bad_names = {}, []
    for im in annotations["images"]:
        if not isinstance(im, dict) or not _is_id(im.get("id")) or im["id"] not in by_id:
            continue  # an image without captions is normal in COCO; never selected
        if usable_name(im.get("file_name")):
            index[im["file_name"]] = by_id[im["id"]]
        else:
            bad_names.append(im.get("file_name"))
    if bad_captions:
        print(
            f"warning: skipped {bad_captions} of {len(annotations['annotations'])} annotations with a "
            f"missing, null, non-string or empty caption"
        )
    if bad_names:
        shown = ", ".join(repr(n)[:120] for n in bad_names[:10]) + (", ..." if len(bad_names) > 10 else "")
        print(
            f"warning: skipped {len(bad_names)} images whose file_name is not a plain name like "
            f"000000000139.jpg: {shown}"
        )
    if not index:
        raise BadAnnotations("it has no image with a usable caption and file_name")
    return index


def read_captions_index(session: requests.Session, cfg: dict) -> dict[str, list[str]]:
    """index_captions() of the split's captions file. A file that is not COCO-shaped is deleted so a
    rerun does not fail the same way; if it came straight out of the zip, the zip goes too."""
    fresh = not captions_json_path(cfg).exists()  # extracted just now, rather than cached
    json_path = fetch_captions_json(session, cfg)
    try:
        return index_captions(load_annotations(json_path))
    except BadAnnotations as e:
        json_path.unlink(missing_ok=True)
        zip_path = json_path.with_name(_ZIP_NAME)
        if fresh:
            zip_path.unlink(missing_ok=True)
            raise common.UserError(
                f"{json_path.name}, just extracted from the zip, is not a COCO captions file ({e}); deleted "
                f"it and the zip: rerun to download them again, or check COCO_BASE_URL "
                f"(now {cfg['COCO_BASE_URL']})"
            ) from None
        raise common.UserError(
            f"{json_path} is not a COCO captions file ({e}); deleted it, rerun to extract "
            f"it again from {zip_path}"
        ) from None


def shuffled_pool(captions_by_file: dict[str, list[str]], seed: int) -> list[str]:
    """Every captioned image, in a seeded random order. Training images are taken from the front,
    test images after them, and failures are replaced by the next in line: same seed, same files."""
    names = sorted(captions_by_file)  # independent of the file's order
    random.Random(seed).shuffle(names)
    return names


# ----------------------------------------------------------------------------- file names and ownership
_TEST_IMAGE = "test_image.jpg"
_OUTPUT_FILES = ("captions.json", "references.json", "metadata.jsonl")
_LEDGER = ".download_coco.jsonl"  # hidden: the images this script wrote in a folder (see Ledger)
# A plain file name in its folder: no '/', '\\', NUL or leading '.', so never '..', a hidden file or
# a path elsewhere. COCO's are 000000xxxxxx.jpg.
_PLAIN_JPG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.jpg")


def plain_jpg(name) -> bool:
    return isinstance(name, str) and _PLAIN_JPG.fullmatch(name) is not None


def usable_name(name) -> bool:
    """True for an annotation file_name we may write as OUTPUT_DIR/name: a plain .jpg name that is
    not one of our own output files (case-insensitively, for case-insensitive file systems)."""
    return plain_jpg(name) and name.lower() not in {_TEST_IMAGE, *_OUTPUT_FILES}


class Ledger:
    """The images this script owns in one folder: a hidden JSON-lines file with one
    {"name", "size", "mtime_ns"} line per image, appended *before* the image is renamed into place,
    so that even after a kill a rerun knows what it wrote. Reruns delete only files listed here
    (and unchanged since), and skip decoding an image whose size and mtime still match (issue 12).
    Names only known from an older version's captions.json have no size: they are owned by name."""

    def __init__(self, folder: Path, previous: Iterable[str] = ()):
        self.folder, self.path, self.lock = folder, folder / _LEDGER, threading.Lock()
        self.entries: dict[str, tuple[int, int] | None] = {}
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                e = json.loads(line)
                name, key = e["name"], (e["size"], e["mtime_ns"])
            except (ValueError, TypeError, KeyError, RecursionError):
                continue  # a line cut by a kill, or edited by hand: ignore it
            if plain_jpg(name):
                self.entries[name] = key if all(isinstance(k, int) for k in key) else None
        for name in previous:
            self.entries.setdefault(name, None)
        self._rewrite()  # before the caller removes captions.json, which `previous` came from

    def _rewrite(self) -> None:
        lines = [
            json.dumps({"name": n, "size": k and k[0], "mtime_ns": k and k[1]}) + "\n"
            for n, k in self.entries.items()
        ]
        common.atomic_write_bytes(self.path, "".join(lines).encode())

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, int]:
        return st.st_size, st.st_mtime_ns

    def record(self, name: str, st: os.stat_result) -> None:
        with self.lock:
            self.entries[name] = self.key(st)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")

    def is_checked(self, name: str, st: os.stat_result) -> bool:
        return self.entries.get(name) == self.key(st)

    def remove_stale(self, keep: set[str]) -> int:
        """Delete the images listed here that are not in `keep` and that nobody changed since we wrote
        them; then list only `keep`. Returns how many were deleted."""
        removed = 0
        for name, key in list(self.entries.items()):
            if name in keep:
                continue
            path = self.folder / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and (key is None or key == self.key(st)):
                path.unlink()
                removed += 1
        self.entries = {n: k for n, k in self.entries.items() if n in keep}
        self._rewrite()
        return removed


def previous_names(folder: Path, extra: Iterable[str] = ()) -> list[str]:
    """The images the folder's captions.json lists (plus `extra` when it exists): what an older
    version of this script, which kept no ledger, wrote there."""
    try:
        listed = json.loads((folder / "captions.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    return [n for n in listed if plain_jpg(n)] + list(extra) if isinstance(listed, dict) else []


# ----------------------------------------------------------------------------- images
def image_problem(data: bytes | Path) -> str | None:
    """None if `data` (bytes or a file) decodes completely as an image.
    verify() misses truncation; load() does not."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = common.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return str(e) or type(e).__name__
    return None


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def place(tmp: Path, path: Path, ledger: Ledger) -> None:
    """Record, then rename into place: a kill leaves no partial file under the final name and no
    file of ours the ledger does not know. No fsync: unchecked changes are decoded again anyway."""
    ledger.record(path.name, os.stat(tmp))  # a rename keeps size and mtime
    os.replace(tmp, path)


def write_image(path: Path, data: bytes, ledger: Ledger) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        place(tmp, path, ledger)
    finally:
        tmp.unlink(missing_ok=True)


def download_body(r: requests.Response, f, cfg: dict, deadline: float, stop: threading.Event) -> str | None:
    """Copy r's body into `f`; None when whole, else why not. Checks the deadline, the byte cap and
    Ctrl-C between socket reads, so a drip or an endless body cannot hold a worker or fill memory."""
    cap = cfg["MAX_IMAGE_MB"] * _MB
    size = 0
    while True:
        try:
            chunk = read_some(r)
        except (OSError, urllib3.exceptions.HTTPError) as e:  # network errors: not the disk's
            return describe(e)
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            return f"larger than MAX_IMAGE_MB={cfg['MAX_IMAGE_MB']:g}"
        f.write(chunk)
        if stop.is_set():
            return "stopped"
        if time.monotonic() > deadline:
            return f"not whole after IMAGE_DEADLINE={cfg['IMAGE_DEADLINE']:g}s ({size} bytes so far)"
    expected = declared_length(r)
    if expected is not None and "Content-Encoding" not in r.headers and expected != size:
        return f"truncated: {size} of {expected} bytes"
    return None


def fetch_image(
    session: requests.Session, url: str, path: Path, cfg: dict, ledger: Ledger, stop: threading.Event
) -> tuple[str, str]:
    """Make `path` a valid image: ('present', '') if it already is, ('downloaded', '') after a
    checked download, ('failed', reason) otherwise. Only a whole, decodable body is renamed into place."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):  # a link, folder or device of that name: not ours to touch
            return "failed", "something that is not a plain file is in the way (left alone)"
        if ledger.is_checked(path.name, st):  # decoded (or written) by us, and unchanged since
            return "present", ""
        if st.st_size <= cfg["MAX_IMAGE_MB"] * _MB and image_problem(path) is None:
            ledger.record(path.name, st)
            return "present", ""
    deadline = time.monotonic() + cfg["IMAGE_DEADLINE"]
    tmp = temp_path(path)
    try:
        with session.get(url, timeout=cfg["TIMEOUT"], stream=True) as r:
            if r.status_code != 200:
                return "failed", f"HTTP {r.status_code}"
            length = declared_length(r)
            if length is not None and length > cfg["MAX_IMAGE_MB"] * _MB:
                cap = cfg["MAX_IMAGE_MB"]
                return "failed", f"larger than MAX_IMAGE_MB={cap:g} (announced: {length} bytes)"
            with open(tmp, "wb") as f:
                problem = download_body(r, f, cfg, deadline, stop)
        if problem is not None:
            return "failed", problem
        problem = image_problem(tmp)
        if problem is not None:
            return "failed", f"not a valid image ({problem})"
        place(tmp, path, ledger)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        return "failed", describe(e)
    except OSError as e:
        raise common.UserError(
            f"cannot write {path} ({e.strerror}); free some space or change the output folder"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return "downloaded", ""


def fetch_many(
    fetch: Callable[[str, threading.Event], tuple[str, str]],
    names: Iterator[str],
    want: int,
    workers: int,
    max_failures_in_a_row: int,
    desc: str,
    stop_hint: str,
    grace_s: float = 30.0,
) -> dict:
    """Run fetch(name, stop) on `workers` threads until `want` succeed, replacing each failure by the
    next name from `names` (shared between calls). Returns the successes in pool order and the failures.

    After max_failures_in_a_row failures in a row nothing new starts, and the downloads already running
    get up to grace_s seconds to end, so an image that was arriving when others began to fail is kept;
    then the error is raised. The workers are daemon threads: on Ctrl-C or an error, `stop` is set (they
    check it between reads) and the process can exit at once. A ThreadPoolExecutor would join its
    threads at exit, waiting on a stalled request for up to (RETRIES + 1) x TIMEOUT."""
    order = itertools.count()
    ok: list[tuple[int, str]] = []
    failures: list[tuple[str, str]] = []
    counts = {"downloaded": 0, "present": 0, "replaced": 0}
    in_a_row = 0
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while (task := tasks.get()) is not None and not stop.is_set():
            try:
                outcome = fetch(task[1], stop)
            except BaseException as e:  # a UserError (disk full): re-raised in the main thread
                outcome = e
            results.put((*task, outcome))

    def submit_next() -> bool:
        name = next(names, None)
        if name is not None:
            tasks.put((next(order), name))
        return name is not None

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, want))]
    for t in threads:
        t.start()
    try:
        running = sum(submit_next() for _ in range(want))
        give_up, grace_end = None, 0.0  # the error to raise once the running downloads have ended
        with tqdm(total=want, desc=desc, unit="img") as bar:
            while running:
                try:
                    wait = None if give_up is None else max(grace_end - time.monotonic(), 0.0)
                    idx, name, outcome = results.get(timeout=wait)
                except queue.Empty:  # the grace is over: stop sets, the rest end at their next read
                    break
                running -= 1
                if isinstance(outcome, BaseException):
                    raise outcome
                status, reason = outcome
                if status != "failed":
                    ok.append((idx, name))
                    counts[status] += 1
                    in_a_row = 0
                    bar.update()
                    continue
                failures.append((name, reason))
                in_a_row += 1
                if give_up is not None:
                    continue
                tqdm.write(f"  failed {name}: {reason}; taking another image")
                if in_a_row >= max_failures_in_a_row:
                    give_up = common.UserError(
                        f"{in_a_row} downloads in a row failed (last: {name}: {reason}); {stop_hint}"
                    )
                    grace_end = time.monotonic() + grace_s
                    continue
                added = submit_next()
                running += added
                counts["replaced"] += added
        if give_up is not None:
            raise give_up
    finally:
        stop.set()  # running downloads end at their next read; queued ones are never started
        for _ in threads:
            tasks.put(None)
    return {"names": [n for _, n in sorted(ok)], "failures": failures, **counts}


# ----------------------------------------------------------------------------- outputs
def clear_outputs(folder: Path) -> None:
    """Remove the JSON files (they mark a complete folder) and temporary files a killed run left."""
    for name in _OUTPUT_FILES:
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_outputs(
    folder: Path,
    names: list[str],
    captions_by_file: dict[str, list[str]],
    mistakes: bool,
    metadata: bool,
    copies: dict[str, str] | None = None,
) -> dict[str, str]:
    """`copies` maps extra file names to the image they copy (test_image.jpg): they get its references,
    so inference.py can score the default single image, but no entry in captions.json."""
    captions = {n: training_caption(captions_by_file[n][0], mistakes) for n in names}
    references = {n: captions_by_file[n] for n in names}
    references.update({alias: captions_by_file[n] for alias, n in (copies or {}).items()})
    common.atomic_write_json(folder / "references.json", references)
    if metadata:
        lines = "".join(
            json.dumps({"file_name": n, "text": c}, ensure_ascii=False) + "\n" for n, c in captions.items()
        )
        common.atomic_write_bytes(folder / "metadata.jsonl", lines.encode("utf-8"))
    common.atomic_write_json(folder / "captions.json", captions)  # last: the folder is now complete
    return captions


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.print_config(cfg, "download_coco.py")
    check_config(cfg)
    check_folders(cfg)
    start = time.perf_counter()
    out = common.check_writable(cfg["OUTPUT_DIR"], "OUTPUT_DIR")
    samples = common.check_writable(cfg["SAMPLES_DIR"], "SAMPLES_DIR")
    common.check_writable(cfg["ANNOTATIONS_DIR"], "ANNOTATIONS_DIR")
    base = cfg["COCO_BASE_URL"].rstrip("/")
    session = make_session(cfg["WORKERS"], cfg["RETRIES"], cfg["RETRY_BACKOFF"])

    captions_by_file = read_captions_index(session, cfg)
    pool = shuffled_pool(captions_by_file, cfg["SEED"])
    print(f"{len(pool)} {cfg['SPLIT']} images have captions")
    n_train, n_test = cfg["NUM_IMAGES"], cfg["NUM_TEST_IMAGES"]
    if len(pool) < n_train + n_test:
        print(
            f"warning: only {len(pool)} images to choose from, "
            f"fewer than NUM_IMAGES + NUM_TEST_IMAGES = {n_train + n_test}"
        )

    # What we own, read before clear_outputs removes the captions.json an older version left.
    ledgers = {
        out: Ledger(out, previous_names(out)),
        samples: Ledger(samples, previous_names(samples, [_TEST_IMAGE])),
    }
    for folder in (out, samples):
        clear_outputs(folder)  # from here until the JSON is rewritten, the folders are "incomplete"
    names = iter(pool)  # shared: test images come after the training ones, so the two never overlap
    runs = []
    for folder, want, desc in ((out, n_train, "train images"), (samples, n_test, "test images")):

        def fetch(name: str, stop: threading.Event, folder: Path = folder) -> tuple[str, str]:
            url = f"{base}/{cfg['SPLIT']}/{name}"
            return fetch_image(session, url, folder / name, cfg, ledgers[folder], stop)

        hint = f"is the server at COCO_BASE_URL={base} up? Rerun to resume: finished images in {folder} stay"
        runs.append(
            fetch_many(
                fetch, names, want, cfg["WORKERS"], cfg["MAX_FAILURES_IN_A_ROW"], desc, hint, cfg["TIMEOUT"]
            )
        )
    train, test = runs

    write_outputs(out, train["names"], captions_by_file, cfg["ADD_MISTAKES"], metadata=True)
    copies = {_TEST_IMAGE: test["names"][0]} if test["names"] else {}
    for alias, name in copies.items():
        write_image(samples / alias, (samples / name).read_bytes(), ledgers[samples])
    write_outputs(
        samples, test["names"], captions_by_file, cfg["ADD_MISTAKES"], metadata=False, copies=copies
    )
    stale = ledgers[out].remove_stale(set(train["names"]))
    stale += ledgers[samples].remove_stale(set(test["names"]) | set(copies))

    failed, replaced = len(train["failures"]) + len(test["failures"]), train["replaced"] + test["replaced"]
    for got, want, what in ((len(train["names"]), n_train, "training"), (len(test["names"]), n_test, "test")):
        if got < want:
            print(
                f"warning: delivered only {got} of {want} {what} images: "
                f"the pool of captioned {cfg['SPLIT']} images ran out"
            )
    elapsed = time.perf_counter() - start
    print(
        f"delivered {len(train['names'])}/{n_train} training images to {out}/ and "
        f"{len(test['names'])}/{n_test} test images to {samples}/ ({replaced} replaced, {failed} failed, "
        f"{train['downloaded'] + test['downloaded']} downloaded, "
        f"{train['present'] + test['present']} already there, {stale} stale removed) in {elapsed:.1f}s"
    )
    return {
        "train": train["names"],
        "test": test["names"],
        "failures": train["failures"] + test["failures"],
        "delivered": len(train["names"]),
        "test_delivered": len(test["names"]),
        "replaced": replaced,
        "failed": failed,
        "downloaded": train["downloaded"] + test["downloaded"],
        "present": train["present"] + test["present"],
        "stale_removed": stale,
        "elapsed_s": elapsed,
        "output_dir": str(out),
        "samples_dir": str(samples),
    }


if __name__ == "__main__":
    common.cli(main)()
