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

Reruns are cheap and safe: valid images already on disk are kept, the annotation zip is resumed with
HTTP Range and reused, and every file is written under a temporary name and renamed when whole.
The JSON files are written last, so their presence means the folder is complete. At the end, *.jpg
files in OUTPUT_DIR / SAMPLES_DIR that are not in this run's selection (left by an older run with
another SEED or count) are deleted, so the folders hold exactly what the JSON files list.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import threading
import time
import zipfile
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

import common

# ---- source
COCO_BASE_URL = "http://images.cocodataset.org"  # or a mirror with the same layout, e.g. http://127.0.0.1:8765
SPLIT = "val2017"  # val2017 (5,000 images) | train2017 (118,287 images)
# ---- selection
NUM_IMAGES = 100  # training images to deliver into OUTPUT_DIR (>= 1)
NUM_TEST_IMAGES = 10  # held-out images for SAMPLES_DIR (>= 1), never among the training images
SEED = 42  # any int; the same seed picks the same images
ADD_MISTAKES = True  # True: captions.json gets the tutorial's mistakes | False: clean first captions
# ---- output
OUTPUT_DIR = "coco_sample"  # training images + captions.json, references.json, metadata.jsonl
SAMPLES_DIR = "samples"  # held-out images + their captions.json, references.json, test_image.jpg
ANNOTATIONS_DIR = ".cache/coco"  # the annotation zip and extracted captions json (delete it after changing COCO_BASE_URL)
# ---- network
WORKERS = 32  # parallel image downloads (1 = one at a time); 32 hides a far server's latency, CDN-friendly
TIMEOUT = 30.0  # seconds to wait for a connection or for the next bytes of a response
RETRIES = 5  # retries per request on connection errors, timeouts, 429 and 5xx (0 = none)
RETRY_BACKOFF = 0.5  # seconds; waits grow as 0, 2x, 4x, 8x... this between retries
MAX_FAILURES_IN_A_ROW = 20  # stop (rerun resumes) when this many images fail with no success between

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
def check_config(cfg: dict) -> None:
    """Fail in one line, before any network, on settings that cannot work."""
    if cfg["SPLIT"] not in _VALID_SPLITS:
        raise common.UserError(f"SPLIT={cfg['SPLIT']!r} is not a COCO 2017 split; valid: {', '.join(_VALID_SPLITS)}")
    for name in ("NUM_IMAGES", "NUM_TEST_IMAGES", "WORKERS", "MAX_FAILURES_IN_A_ROW"):
        if cfg[name] <= 0:
            raise common.UserError(f"{name}={cfg[name]} must be a positive number")
    if cfg["TIMEOUT"] <= 0 or cfg["RETRIES"] < 0 or cfg["RETRY_BACKOFF"] < 0:
        raise common.UserError("TIMEOUT must be > 0, and RETRIES and RETRY_BACKOFF >= 0")


def make_session(workers: int, retries: int, backoff: float) -> requests.Session:
    """One Session shared by all threads: its connection pool is reused, and urllib3 retries
    connection errors, timeouts, 429 and 5xx with exponential backoff (GET is safe to repeat)."""
    retry = Retry(
        total=retries, connect=retries, read=retries, status=retries,
        backoff_factor=backoff, status_forcelist=_RETRY_STATUSES,
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
    if isinstance(exc, requests.Timeout) or "timed out" in str(inner).lower():
        return "no answer within TIMEOUT"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-body (truncated)"
    text = str(inner).split(": ", 1)[-1] if isinstance(inner, Exception) else str(inner)
    return f"{type(inner).__name__}: {text}"[:160]


# ----------------------------------------------------------------------------- annotations
def download_resumable(session: requests.Session, url: str, dest: Path, timeout: float, attempts: int, base_url: str) -> Path:
    """Fetch url into `dest.part`, resuming what a previous (killed) run left via HTTP Range,
    and return the .part path once it has the full length. The caller validates and renames."""
    part = dest.with_name(dest.name + ".part")
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        try:
            r = session.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=timeout)
        except requests.RequestException as e:
            raise common.UserError(
                f"cannot reach {url} ({describe(e)}); check your network or set COCO_BASE_URL (now {base_url}) to a mirror"
            ) from None
        with r:
            if r.status_code == 416:  # nothing left to send: the part is already whole (or bogus)
                return part
            if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)  # a range we did not ask for: start over
                continue
            if r.status_code not in (200, 206):
                raise common.UserError(f"HTTP {r.status_code} for {url}; check COCO_BASE_URL (now {base_url})")
            if r.status_code == 200:
                have = 0  # the server ignored Range (or this is a fresh start): rewrite from byte 0
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            try:
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, leave=False,
                ) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            except requests.RequestException as e:
                print(f"  {dest.name}: {describe(e)} at {part.stat().st_size} bytes; resuming")
                continue
        if total is None or part.stat().st_size == total:
            return part
        print(f"  {dest.name}: got {part.stat().st_size} of {total} bytes; resuming")
    raise common.UserError(
        f"download of {url} kept breaking off after {attempts} tries; rerun to resume it ({part} is kept)"
    )


def zip_problem(path: Path, member: str) -> str | None:
    """None if `path` is a whole zip holding `member`, else what is wrong. testzip() checks every CRC."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
            if member not in z.namelist():
                return f"it has no {member}"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e) or type(e).__name__
    return None


def fetch_captions_json(session: requests.Session, cfg: dict) -> Path:
    """Return the path of captions_{SPLIT}.json, extracting it from the (downloaded once) zip."""
    cache = Path(cfg["ANNOTATIONS_DIR"])
    member = f"annotations/captions_{cfg['SPLIT']}.json"
    json_path = cache / Path(member).name
    if json_path.exists():  # written by rename, so it is whole
        return json_path
    zip_path = cache / _ZIP_NAME
    if not zip_path.exists():
        base = cfg["COCO_BASE_URL"].rstrip("/")
        url = f"{base}/annotations/{_ZIP_NAME}"
        print(f"downloading {url} -> {zip_path}")
        part = download_resumable(session, url, zip_path, cfg["TIMEOUT"], cfg["RETRIES"] + 1, cfg["COCO_BASE_URL"])
        problem = zip_problem(part, member)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise common.UserError(f"downloaded {url} is not a valid annotation zip ({problem}); deleted it, rerun to fetch it again")
        os.replace(part, zip_path)
    else:
        problem = zip_problem(zip_path, member)
        if problem is not None:
            zip_path.unlink()
            raise common.UserError(f"{zip_path} is not a valid annotation zip ({problem}); deleted it, rerun to fetch it again")
    # Stream the one member we need to a temporary name, then rename: whole or absent.
    tmp = json_path.with_name(json_path.name + ".tmp")
    with zipfile.ZipFile(zip_path) as z, z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, json_path)
    return json_path


def load_annotations(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise common.UserError(f"cannot parse {path} ({e}); delete it and rerun") from None


def index_captions(annotations: dict) -> dict[str, list[str]]:
    """{file_name: [captions in annotation-file order]} for images that have captions, built in
    one pass over the annotations (the tutorial rescanned them all for every image: quadratic)."""
    by_id: dict[int, list[str]] = {}
    for a in annotations["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"])
    return {im["file_name"]: by_id[im["id"]] for im in annotations["images"] if im["id"] in by_id}


def shuffled_pool(captions_by_file: dict[str, list[str]], seed: int) -> list[str]:
    """Every captioned image, in a seeded random order. Training images are taken from the front,
    test images after them, and failures are replaced by the next in line: same seed, same files."""
    names = sorted(captions_by_file)  # independent of the file's order
    random.Random(seed).shuffle(names)
    return names


# ----------------------------------------------------------------------------- images
def image_problem(data: bytes) -> str | None:
    """None if `data` decodes completely as an image. verify() misses truncation; load() does not."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = common.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return str(e) or type(e).__name__
    return None


def write_image(path: Path, data: bytes) -> None:
    """Temporary name, then rename: a kill leaves no partial file under the final name. No fsync
    (unlike common.atomic_write_bytes): every run re-checks existing images by decoding them anyway."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_image(session: requests.Session, url: str, path: Path, timeout: float) -> tuple[str, str]:
    """Make `path` a valid image: ('present', '') if it already is, ('downloaded', '') after a
    checked download, ('failed', reason) otherwise. Only a whole, decodable body is renamed into place."""
    if path.exists() and image_problem(path.read_bytes()) is None:
        return "present", ""
    try:
        r = session.get(url, timeout=timeout)
        data = r.content
    except requests.RequestException as e:
        return "failed", describe(e)
    if r.status_code != 200:
        return "failed", f"HTTP {r.status_code}"
    expected = r.headers.get("Content-Length")
    if expected is not None and "Content-Encoding" not in r.headers and int(expected) != len(data):
        return "failed", f"truncated: {len(data)} of {expected} bytes"
    problem = image_problem(data)
    if problem is not None:
        return "failed", f"not a valid image ({problem})"
    try:
        write_image(path, data)
    except OSError as e:
        raise common.UserError(f"cannot write {path} ({e.strerror}); free some space or change the output folder") from None
    return "downloaded", ""


def fetch_many(fetch: Callable[[str], tuple[str, str]], names: Iterator[str], want: int, workers: int,
               max_failures_in_a_row: int, desc: str, stop_hint: str) -> dict:
    """Run fetch(name) on `workers` threads until `want` succeed, replacing each failure by the next
    name from `names` (shared between calls). Returns the successes in pool order and the failures."""
    order = itertools.count()
    ok: list[tuple[int, str]] = []
    failures: list[tuple[str, str]] = []
    counts = {"downloaded": 0, "present": 0, "replaced": 0}
    in_a_row = 0
    with futures.ThreadPoolExecutor(max_workers=workers) as executor, tqdm(total=want, desc=desc, unit="img") as bar:
        running = {}

        def submit_next() -> bool:
            name = next(names, None)
            if name is not None:
                running[executor.submit(fetch, name)] = (next(order), name)
            return name is not None

        try:
            for _ in range(want):
                submit_next()
            while running:
                finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    idx, name = running.pop(future)
                    status, reason = future.result()
                    if status != "failed":
                        ok.append((idx, name))
                        counts[status] += 1
                        in_a_row = 0
                        bar.update()
                        continue
                    failures.append((name, reason))
                    in_a_row += 1
                    tqdm.write(f"  failed {name}: {reason}; taking another image")
                    if in_a_row >= max_failures_in_a_row:
                        raise common.UserError(f"{in_a_row} downloads in a row failed (last: {name}: {reason}); {stop_hint}")
                    counts["replaced"] += submit_next()
        except BaseException:
            for future in running:  # do not start queued downloads; running ones end by TIMEOUT
                future.cancel()
            raise
    return {"names": [n for _, n in sorted(ok)], "failures": failures, **counts}


# ----------------------------------------------------------------------------- outputs
_OUTPUT_FILES = ("captions.json", "references.json", "metadata.jsonl")


def clear_outputs(folder: Path) -> None:
    """Remove the JSON files (they mark a complete folder) and temporary files a killed run left."""
    for name in _OUTPUT_FILES:
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_outputs(folder: Path, names: list[str], captions_by_file: dict[str, list[str]], mistakes: bool,
                  metadata: bool, copies: dict[str, str] | None = None) -> dict[str, str]:
    """`copies` maps extra file names to the image they copy (test_image.jpg): they get its references,
    so inference.py can score the default single image, but no entry in captions.json."""
    captions = {n: training_caption(captions_by_file[n][0], mistakes) for n in names}
    references = {n: captions_by_file[n] for n in names}
    references.update({alias: captions_by_file[n] for alias, n in (copies or {}).items()})
    common.atomic_write_json(folder / "references.json", references)
    if metadata:
        lines = "".join(json.dumps({"file_name": n, "text": c}, ensure_ascii=False) + "\n" for n, c in captions.items())
        common.atomic_write_bytes(folder / "metadata.jsonl", lines.encode("utf-8"))
    common.atomic_write_json(folder / "captions.json", captions)  # last: the folder is now complete
    return captions


def remove_stale_images(folder: Path, keep: set[str]) -> int:
    """Delete *.jpg not in this run's selection, so the folder holds exactly what the JSON lists."""
    stale = [p for p in folder.glob("*.jpg") if p.name not in keep]
    for p in stale:
        p.unlink()
    return len(stale)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.print_config(cfg, "download_coco.py")
    check_config(cfg)
    start = time.perf_counter()
    out = common.check_writable(cfg["OUTPUT_DIR"], "OUTPUT_DIR")
    samples = common.check_writable(cfg["SAMPLES_DIR"], "SAMPLES_DIR")
    common.check_writable(cfg["ANNOTATIONS_DIR"], "ANNOTATIONS_DIR")
    base = cfg["COCO_BASE_URL"].rstrip("/")
    session = make_session(cfg["WORKERS"], cfg["RETRIES"], cfg["RETRY_BACKOFF"])

    captions_by_file = index_captions(load_annotations(fetch_captions_json(session, cfg)))
    pool = shuffled_pool(captions_by_file, cfg["SEED"])
    print(f"{len(pool)} {cfg['SPLIT']} images have captions")
    n_train, n_test = cfg["NUM_IMAGES"], cfg["NUM_TEST_IMAGES"]
    if len(pool) < n_train + n_test:
        print(f"warning: only {len(pool)} images to choose from, fewer than NUM_IMAGES + NUM_TEST_IMAGES = {n_train + n_test}")

    for folder in (out, samples):
        clear_outputs(folder)  # from here until the JSON is rewritten, the folders are "incomplete"
    names = iter(pool)  # shared: test images come after the training ones, so the two never overlap
    runs = []
    for folder, want, desc in ((out, n_train, "train images"), (samples, n_test, "test images")):

        def fetch(name: str, folder: Path = folder) -> tuple[str, str]:
            return fetch_image(session, f"{base}/{cfg['SPLIT']}/{name}", folder / name, cfg["TIMEOUT"])

        hint = f"is the server at COCO_BASE_URL={base} up? Rerun to resume: finished images in {folder} are kept"
        runs.append(fetch_many(fetch, names, want, cfg["WORKERS"], cfg["MAX_FAILURES_IN_A_ROW"], desc, hint))
    train, test = runs

    write_outputs(out, train["names"], captions_by_file, cfg["ADD_MISTAKES"], metadata=True)
    copies = {"test_image.jpg": test["names"][0]} if test["names"] else {}
    for alias, name in copies.items():
        common.atomic_write_bytes(samples / alias, (samples / name).read_bytes())
    write_outputs(samples, test["names"], captions_by_file, cfg["ADD_MISTAKES"], metadata=False, copies=copies)
    stale = remove_stale_images(out, set(train["names"])) + remove_stale_images(
        samples, set(test["names"]) | ({"test_image.jpg"} if test["names"] else set()))

    failed, replaced = len(train["failures"]) + len(test["failures"]), train["replaced"] + test["replaced"]
    for got, want, what in ((len(train["names"]), n_train, "training"), (len(test["names"]), n_test, "test")):
        if got < want:
            print(f"warning: delivered only {got} of {want} {what} images: the pool of captioned {cfg['SPLIT']} images ran out")
    elapsed = time.perf_counter() - start
    print(
        f"delivered {len(train['names'])}/{n_train} training images to {out}/ and {len(test['names'])}/{n_test} "
        f"test images to {samples}/ ({replaced} replaced, {failed} failed, "
        f"{train['downloaded'] + test['downloaded']} downloaded, {train['present'] + test['present']} already there, "
        f"{stale} stale removed) in {elapsed:.1f}s"
    )
    return {
        "train": train["names"], "test": test["names"],
        "failures": train["failures"] + test["failures"],
        "delivered": len(train["names"]), "test_delivered": len(test["names"]),
        "replaced": replaced, "failed": failed,
        "downloaded": train["downloaded"] + test["downloaded"], "present": train["present"] + test["present"],
        "stale_removed": stale, "elapsed_s": elapsed,
        "output_dir": str(out), "samples_dir": str(samples),
    }


if __name__ == "__main__":
    common.cli(main)()
