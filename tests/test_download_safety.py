"""download_coco.py against a hostile server, a hostile annotation file and a careless user (issue 11).

- file names from the annotation file that point outside the output folder, or at our own files;
- deletes: only what this script wrote, even after a killed run; overlapping folders refused;
- a dripping body, a silent server and Ctrl-C; a long Retry-After; an endless body; a zip bomb;
- malformed annotation files (one-line errors, no bad cache kept) and bad single captions;
- reruns that decode nothing already checked (issue 12).

Every hostile handler is bounded in time and count, and stops when the client goes away.
"""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import download_coco as dl
from common import UserError
from conftest import REPO, make_coco_mirror

ZIP = "/annotations/annotations_trainval2017.zip"
MEMBER = "annotations/captions_val2017.json"


# ----------------------------------------------------------------------------- helpers
def args_for(url: str, root: Path, *extra: str) -> list[str]:
    return [
        f"--COCO_BASE_URL={url}",
        f"--OUTPUT_DIR={root / 'out'}",
        f"--SAMPLES_DIR={root / 'samples'}",
        f"--ANNOTATIONS_DIR={root / 'cache'}",
        "--RETRY_BACKOFF=0.01",
        "--TIMEOUT=5",
        "--WORKERS=4",
        "--NUM_IMAGES=6",
        "--NUM_TEST_IMAGES=2",
        *extra,
    ]


def jpgs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.jpg")}


def reply(handler, status: int, body: bytes = b"", headers: dict | None = None) -> bool:
    handler.send_response(status)
    for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    handler.close_connection = True
    return True


def jpeg_bytes(colour=(200, 40, 40), size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def annotations_of(mirror: Path) -> dict:
    with zipfile.ZipFile(mirror / ZIP.lstrip("/")) as z:
        return json.loads(z.read(MEMBER))


def write_member(mirror: Path, data: bytes | dict, compression: int = zipfile.ZIP_STORED) -> Path:
    """Replace the annotation zip with one whose captions member holds `data`."""
    path = mirror / ZIP.lstrip("/")
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr(MEMBER, data if isinstance(data, bytes) else json.dumps(data))
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def drip(handler, seconds: float, every: float = 0.05, length: int = 10_000) -> bool:
    """Announce `length` bytes, then send one byte every `every` s: bounded by `seconds` and by the client."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            handler.wfile.write(b"\xff")
            handler.wfile.flush()
            time.sleep(every)
    except OSError:  # the client gave up: exactly what we want
        pass
    handler.close_connection = True
    return True


def silent(handler, seconds: float) -> bool:
    """Accept the request and never answer; bounded by `seconds`."""
    time.sleep(seconds)
    handler.close_connection = True
    return True


def endless(handler, seconds: float, length: str | None = None) -> bool:
    """A body that never ends (close-delimited, or with a huge Content-Length); bounded by `seconds`."""
    handler.send_response(200)
    if length is not None:
        handler.send_header("Content-Length", length)
    handler.end_headers()
    block, end = b"\0" * 65536, time.monotonic() + seconds
    try:
        for _ in range(2000):  # 125 MB at most
            if time.monotonic() > end:
                break
            handler.wfile.write(block)
    except OSError:
        pass
    handler.close_connection = True
    return True


@pytest.fixture
def mirror(tmp_path) -> Path:
    return make_coco_mirror(tmp_path / "mirror", n_images=12)


def pool_of(mirror: Path, seed: int = dl.SEED) -> list[str]:
    return dl.shuffled_pool(dl.index_captions(annotations_of(mirror)), seed)


# ----------------------------------------------------------------------------- item 1: file names
@pytest.mark.parametrize(
    "name",
    [
        "../../x.jpg",
        "/abs/path.jpg",
        "/dev/zero",
        "sub/dir.jpg",
        "sub\\dir.jpg",
        ".",
        "..",
        "",
        ".hidden.jpg",
        "a\x00b.jpg",
        "captions.json",
        "references.json",
        "metadata.jsonl",
        "test_image.jpg",
        "TEST_IMAGE.jpg",
        "x.png",
        42,
        None,
        ["a.jpg"],
        {"a": 1},
    ],
)
def test_only_plain_coco_style_names_are_usable(name):
    assert not dl.usable_name(name)


def test_coco_names_are_usable():
    assert all(dl.usable_name(n) for n in ("000000000139.jpg", "000000581929.jpg", "my_photo-2.jpg"))


def test_hostile_file_names_are_skipped_with_a_warning_and_nothing_escapes(mirror, serve, tmp_path, capsys):
    root = tmp_path / "r" / "s"
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = [
        "../../escape.jpg",
        f"{outside}/abs.jpg",
        "sub/dir.jpg",
        "captions.json",
        "test_image.jpg",
        "references.json",
        ".hidden.jpg",
        42,
    ]
    ann = annotations_of(mirror)
    for i, name in enumerate(hostile, start=500):
        ann["images"].append({"id": i, "file_name": name, "width": 40, "height": 30})
        ann["annotations"].append({"id": 9000 + i, "image_id": i, "caption": "A hostile name on the table."})
    write_member(mirror, ann)
    jpeg = jpeg_bytes()

    def any_missing_path_is_a_jpeg(handler):  # so the old code would really have written them
        real = mirror / handler.path.lstrip("/")
        return handler.path != ZIP and not real.is_file() and reply(handler, 200, jpeg)

    server = serve(mirror, fault=any_missing_path_is_a_jpeg)
    result = dl.main(args_for(server.url, root, "--NUM_IMAGES=10", "--NUM_TEST_IMAGES=4"))
    log = capsys.readouterr().out
    assert (result["delivered"], result["test_delivered"]) == (10, 2)  # only the 12 good ones
    assert not (tmp_path / "r" / "escape.jpg").exists() and list(outside.iterdir()) == []
    assert not (root / "out" / "sub").exists()
    assert json.loads((root / "out" / "captions.json").read_text()).keys() == set(result["train"])
    gets = [p for m, p, _ in server.log if m == "GET" and p != ZIP]
    assert len(gets) == 12 and all(p.startswith("/val2017/0000") for p in gets)  # none of the hostile ones
    warning = [line for line in log.splitlines() if line.startswith("warning:") and "file_name" in line]
    assert len(warning) == 1 and "skipped 8 images" in warning[0]
    assert all(repr(n) in warning[0] for n in hostile[:5])


def test_a_link_in_the_way_is_neither_read_nor_replaced(mirror, serve, tmp_path):
    """A symlink (to /dev/zero, or to a file elsewhere) under a selected name: left alone, image replaced."""
    pool = pool_of(mirror)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(b"the user's file")
    (out / pool[0]).symlink_to("/dev/zero")
    (out / pool[1]).symlink_to(elsewhere)
    result = dl.main(args_for(serve(mirror).url, tmp_path))
    assert sorted(n for n, _ in result["failures"]) == sorted(pool[:2])
    assert all("in the way" in why for _, why in result["failures"])
    assert elsewhere.read_bytes() == b"the user's file"
    assert os.readlink(out / pool[0]) == "/dev/zero" and os.readlink(out / pool[1]) == str(elsewhere)


# ----------------------------------------------------------------------------- item 2: deletes
def test_a_users_own_photos_are_never_deleted(mirror, serve, tmp_path):
    server = serve(mirror)
    first = dl.main(args_for(server.url, tmp_path))
    out = tmp_path / "out"
    mine = {"my_holiday.jpg": b"not even a jpeg", "000000999999.jpg": jpeg_bytes()}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (tmp_path / "samples" / "my_test.jpg").write_bytes(b"mine")
    other = dl.main(args_for(server.url, tmp_path, "--SEED=7"))
    assert other["stale_removed"] > 0 and set(first["train"]) - set(other["train"])
    assert jpgs(out) == set(other["train"]) | set(mine)  # the old selection went, mine stayed
    assert all((out / n).read_bytes() == d for n, d in mine.items())
    assert (tmp_path / "samples" / "my_test.jpg").read_bytes() == b"mine"


def test_a_killed_run_still_knows_what_it_owns(mirror, serve, tmp_path):
    """Run 1 completes; run 2 (another seed) downloads one image and dies after removing captions.json;
    run 3 removes the images of both, which no captions.json lists any more, and keeps the user's."""
    server = serve(mirror)
    first = dl.main(args_for(server.url, tmp_path))
    out = tmp_path / "out"
    (out / "my_photo.jpg").write_bytes(jpeg_bytes())
    served = []

    def three_then_fail(handler):
        if "/val2017/" in handler.path:
            served.append(handler.path)
            return len(served) > 1 and reply(handler, 404)
        return False

    dying = serve(mirror, fault=three_then_fail)
    with pytest.raises(UserError, match="in a row failed"):
        dl.main(args_for(dying.url, tmp_path, "--SEED=7", "--MAX_FAILURES_IN_A_ROW=2", "--WORKERS=1"))
    assert not (out / "captions.json").exists()
    assert len(jpgs(out) - set(first["train"]) - {"my_photo.jpg"}) == 1  # listed in no captions.json

    third = dl.main(args_for(server.url, tmp_path, "--SEED=99"))
    assert jpgs(out) == set(third["train"]) | {"my_photo.jpg"}
    assert jpgs(tmp_path / "samples") == set(third["test"]) | {"test_image.jpg"}


def test_a_folder_from_an_older_version_is_cleaned_by_its_captions_json(mirror, serve, tmp_path):
    """No ledger yet (written by an older download_coco.py): the previous captions.json says what is ours."""
    server = serve(mirror)
    first = dl.main(args_for(server.url, tmp_path))
    for folder in (tmp_path / "out", tmp_path / "samples"):
        (folder / dl._LEDGER).unlink()
    (tmp_path / "out" / "my_photo.jpg").write_bytes(b"mine")
    other = dl.main(args_for(server.url, tmp_path, "--SEED=7"))
    assert other["stale_removed"] == len(set(first["train"]) - set(other["train"])) + len(
        set(first["test"]) - set(other["test"])
    )
    assert jpgs(tmp_path / "out") == set(other["train"]) | {"my_photo.jpg"}


@pytest.mark.parametrize(
    "samples, annotations",
    [
        ("out", "cache"),
        ("out/../out/", "cache"),
        ("out/held_out", "cache"),
        ("samples", "samples/cache"),
        ("samples", "out"),
        ("samples", "."),
        ("link_to_out", "cache"),
    ],
)
def test_overlapping_folders_are_refused_before_anything_happens(
    mirror, serve, tmp_path, samples, annotations
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "my_photo.jpg").write_bytes(b"mine")
    (tmp_path / "link_to_out").symlink_to(tmp_path / "out")
    server = serve(mirror)
    argv = [
        *args_for(server.url, tmp_path),
        f"--SAMPLES_DIR={tmp_path / samples}",
        f"--ANNOTATIONS_DIR={tmp_path / annotations}",
    ]
    with pytest.raises(UserError, match="overlap") as e:
        dl.main(argv)
    assert "separate" in one_line(e)
    assert server.log == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["my_photo.jpg"]


# ----------------------------------------------------------------------------- item 3: hangs and Ctrl-C
def test_a_dripping_image_is_given_up_after_IMAGE_DEADLINE(mirror, serve, tmp_path):
    victim = pool_of(mirror)[0]
    server = serve(mirror, fault=lambda h: h.path.endswith(victim) and drip(h, seconds=8))
    start = time.monotonic()
    result = dl.main(args_for(server.url, tmp_path, "--TIMEOUT=2", "--IMAGE_DEADLINE=1.0", "--RETRIES=0"))
    assert time.monotonic() - start < 5
    assert [n for n, _ in result["failures"]] == [victim]
    assert "IMAGE_DEADLINE" in result["failures"][0][1]
    assert result["delivered"] == 6 and victim not in jpgs(tmp_path / "out")


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the download to get there"
        time.sleep(0.02)


@pytest.mark.parametrize("stall", ["drip", "silent"])
def test_ctrl_c_ends_the_run_within_seconds_and_keeps_finished_images(mirror, serve, tmp_path, stall):
    victim, hung = pool_of(mirror)[0], threading.Event()

    def stall_victim(handler):
        if not handler.path.endswith(victim):
            return False
        hung.set()
        return drip(handler, seconds=10) if stall == "drip" else silent(handler, seconds=10)

    server = serve(mirror, fault=stall_victim)
    out = tmp_path / "out"
    args = args_for(server.url, tmp_path, "--TIMEOUT=30", "--IMAGE_DEADLINE=60")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "download_coco.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: hung.is_set() and len(jpgs(out)) == 5)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert took < 3, f"Ctrl-C took {took:.1f}s"
    assert len(jpgs(out)) == 5 and victim not in jpgs(out) and not (out / "captions.json").exists()
    for p in out.glob("*.jpg"):
        assert dl.image_problem(p.read_bytes()) is None


# ----------------------------------------------------------------------------- item 4: Retry-After
@pytest.mark.parametrize("value", ["40", "soon"])
def test_a_long_or_bogus_retry_after_is_capped_and_logged(mirror, serve, tmp_path, capsys, value):
    victim, asked = pool_of(mirror)[1], []

    def once_429(handler):
        if handler.path.endswith(victim) and not asked:
            asked.append(handler.path)
            return reply(handler, 429, b"slow down", {"Retry-After": value})
        return False

    server = serve(mirror, fault=once_429)
    start = time.monotonic()
    result = dl.main(args_for(server.url, tmp_path, "--RETRIES=2"))
    assert time.monotonic() - start < 8
    assert result["failed"] == 0 and victim in result["train"] and asked
    log = capsys.readouterr().out
    if value == "40":
        assert "asked to wait 40s" in log and "waited 0.08s" in log


# ----------------------------------------------------------------------------- item 5: sizes
@pytest.mark.parametrize("length", [None, "10000000000"])
def test_an_endless_or_huge_image_is_refused_past_MAX_IMAGE_MB(mirror, serve, tmp_path, length):
    victim = pool_of(mirror)[0]
    server = serve(mirror, fault=lambda h: h.path.endswith(victim) and endless(h, seconds=5, length=length))
    start = time.monotonic()
    result = dl.main(args_for(server.url, tmp_path, "--MAX_IMAGE_MB=1", "--RETRIES=0"))
    assert time.monotonic() - start < 4
    assert [n for n, _ in result["failures"]] == [victim]
    assert "larger than MAX_IMAGE_MB" in result["failures"][0][1]
    assert ("announced" in result["failures"][0][1]) == (length is not None)  # refused before any byte
    assert result["delivered"] == 6 and not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.parametrize("announce", [True, False])
def test_a_zip_larger_than_MAX_ZIP_MB_is_refused(mirror, serve, tmp_path, announce):
    data = (mirror / ZIP.lstrip("/")).read_bytes()

    def serve_zip(handler):
        if handler.path != ZIP:
            return False
        if announce:
            return reply(handler, 200, data)
        handler.send_response(200)  # no Content-Length: the size shows only while reading
        handler.end_headers()
        handler.wfile.write(data)
        handler.close_connection = True
        return True

    server = serve(mirror, fault=serve_zip)
    with pytest.raises(UserError, match="MAX_ZIP_MB") as e:
        dl.main(args_for(server.url, tmp_path, f"--MAX_ZIP_MB={len(data) / 2 / 2**20}"))
    assert ("announced" in one_line(e)) == announce  # refused before any byte when it says its size
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("lie", [False, True])
def test_a_zip_bomb_is_one_line_and_nothing_is_kept(mirror, serve, tmp_path, lie):
    """20 MB of JSON that compresses to ~20 kB; with `lie`, the zip also claims a small size."""
    bomb = json.dumps(annotations_of(mirror)).encode() + b" " * 20_000_000
    path = write_member(mirror, bomb, zipfile.ZIP_DEFLATED)
    if lie:  # patch the uncompressed size in the local and central headers to 1,000 bytes
        data = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            at = data.find(signature) + offset
            data[at : at + 4] = (1000).to_bytes(4, "little")
        path.write_bytes(bytes(data))
    server = serve(mirror)
    with pytest.raises(UserError, match="not a valid annotation zip") as e:
        dl.main(args_for(server.url, tmp_path, "--MAX_CAPTIONS_MB=5"))
    # An honest size is refused before extracting; a lying one stops at the size claimed, then fails its CRC.
    assert ("would expand to 19 MB, over MAX_CAPTIONS_MB=5" in one_line(e)) != lie
    assert list((tmp_path / "cache").iterdir()) == []


def test_extraction_counts_bytes_whatever_the_zip_header_says(tmp_path):
    """zip_problem() refuses a declared size over the cap; extract_member() counts too: headers can lie."""
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(MEMBER, b" " * 3_000_000)
    dest = tmp_path / "captions.json"
    assert "MAX_CAPTIONS_MB" in dl.extract_member(path, MEMBER, dest, max_bytes=2_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]
    assert dl.extract_member(path, MEMBER, dest, max_bytes=3_000_000) is None
    assert dest.stat().st_size == 3_000_000


# ----------------------------------------------------------------------------- item 6: annotation files
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "member, problem",
    [
        (b"[1, 2]", "top level is a list"),
        (b'{"annotations": []}', 'no "images" list'),
        (b'{"images": [], "annotations": {}}', 'no "annotations" list'),
        (DEEP, "nested too deeply"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (
            {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": None}]},
            "no image with a usable caption",
        ),
    ],
    ids=["list", "no_images", "annotations_not_list", "deep", "not_json", "not_utf8", "all_null_captions"],
)
def test_a_bad_annotation_file_is_one_line_and_not_kept(mirror, serve, tmp_path, member, problem):
    write_member(mirror, member)
    server = serve(mirror)
    with pytest.raises(UserError, match="not a COCO captions file") as e:
        dl.main(args_for(server.url, tmp_path))
    text = one_line(e)
    assert problem in text and "deleted" in text and "the zip" in text
    assert list((tmp_path / "cache").iterdir()) == []  # a rerun downloads and extracts again


def test_a_bad_cached_captions_file_is_deleted_and_extracted_again(mirror, serve, tmp_path):
    server = serve(mirror)
    dl.main(args_for(server.url, tmp_path))
    cached = tmp_path / "cache" / "captions_val2017.json"
    cached.write_text('{"images": null}')
    match = "captions_val2017.json is not a COCO captions file .*rerun to extract"
    with pytest.raises(UserError, match=match) as e:
        dl.main(args_for(server.url, tmp_path))
    one_line(e)
    assert not cached.exists() and (tmp_path / "cache" / "annotations_trainval2017.zip").exists()
    n = len(server.log)
    assert dl.main(args_for(server.url, tmp_path))["delivered"] == 6
    assert server.log[n:] == []  # extracted from the kept zip; every image was already there


# ----------------------------------------------------------------------------- items 6 and 7: single captions
def test_bad_single_captions_are_skipped_with_a_count_and_the_first_non_empty_one_is_used(
    mirror, serve, tmp_path, capsys
):
    ann = annotations_of(mirror)
    by_image: dict[int, list[dict]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    name_of = {im["id"]: im["file_name"] for im in ann["images"]}
    blank_first, all_blank, broken = 1, 2, 3
    by_image[blank_first][0]["caption"] = "   "
    for a in by_image[all_blank]:
        a["caption"] = ""
    by_image[broken][0]["caption"] = None
    del by_image[broken][1]["caption"]
    by_image[broken][2]["caption"] = 42
    ann["annotations"].append("not even an object")
    write_member(mirror, ann)
    server = serve(mirror)
    result = dl.main(args_for(server.url, tmp_path, "--NUM_IMAGES=9", "--NUM_TEST_IMAGES=2"))
    assert (result["delivered"], result["test_delivered"]) == (9, 2)  # 11 captioned images are left
    assert name_of[all_blank] not in result["train"] + result["test"]
    captions = json.loads((tmp_path / "out" / "captions.json").read_text())
    captions.update(json.loads((tmp_path / "samples" / "captions.json").read_text()))
    assert captions[name_of[blank_first]] == dl.add_mistakes(by_image[blank_first][1]["caption"])
    assert captions[name_of[broken]] == dl.add_mistakes(by_image[broken][3]["caption"])
    assert all(c[0].isalnum() for c in captions.values())
    log = capsys.readouterr().out
    assert "skipped 10 of" in log and "annotations with a missing, null, non-string or empty caption" in log


# ----------------------------------------------------------------------------- item 8 (issue 12)
def test_a_rerun_decodes_nothing_it_checked_before_and_rechecks_a_changed_file(
    mirror, serve, tmp_path, monkeypatch
):
    server = serve(mirror)
    first = dl.main(args_for(server.url, tmp_path))
    decoded = []
    real = dl.image_problem
    monkeypatch.setattr(dl, "image_problem", lambda data: decoded.append(data) or real(data))
    again = dl.main(args_for(server.url, tmp_path))
    assert (again["present"], again["downloaded"], decoded) == (8, 0, [])

    out = tmp_path / "out"
    touched, cut = out / first["train"][0], out / first["train"][1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes
    cut.write_bytes(cut.read_bytes()[:300])
    n = len(server.log)
    third = dl.main(args_for(server.url, tmp_path))
    assert [p for m, p, _ in server.log[n:]] == [f"/val2017/{cut.name}"]
    assert (third["present"], third["downloaded"]) == (7, 1)
    assert len(decoded) == 3  # the touched file, the cut one, and its fresh download
    decoded.clear()
    dl.main(args_for(server.url, tmp_path))
    assert decoded == []
