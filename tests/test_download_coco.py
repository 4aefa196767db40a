"""Tests of download_coco.py against a real HTTP server on loopback.

- the mistake rule, the caption index and the seeded selection (pure functions);
- end to end on ../shared/coco_mirror (100 + 10 images) and on a synthetic mirror;
- a fault-injecting server: 404, a 500 then success, truncated JPEGs, a response slower than
  TIMEOUT, a truncated or corrupt zip, a server that ignores Range, a server dying mid-run;
- kill -9 mid-download (images and zip): the rerun completes and nothing truncated is accepted.
"""

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
from conftest import REPO, free_port, make_coco_mirror

ZIP = "/annotations/annotations_trainval2017.zip"


# ----------------------------------------------------------------------------- helpers
def args_for(url: str, root: Path, *extra: str) -> list[str]:
    """Outputs under `root`, tiny retry backoff so failure cases stay fast."""
    return [
        f"--COCO_BASE_URL={url}",
        f"--OUTPUT_DIR={root / 'out'}",
        f"--SAMPLES_DIR={root / 'samples'}",
        f"--ANNOTATIONS_DIR={root / 'cache'}",
        "--RETRY_BACKOFF=0.01",
        "--TIMEOUT=5",
        "--WORKERS=4",
        *extra,
    ]


def small(*extra: str) -> tuple[str, ...]:
    return ("--NUM_IMAGES=6", "--NUM_TEST_IMAGES=2", *extra)


def raw_annotations(mirror: Path, split: str = "val2017") -> dict:
    with zipfile.ZipFile(mirror / "annotations" / "annotations_trainval2017.zip") as z:
        return json.loads(z.read(f"annotations/captions_{split}.json"))


def pool_of(mirror: Path, seed: int = dl.SEED) -> list[str]:
    return dl.shuffled_pool(dl.index_captions(raw_annotations(mirror)), seed)


def jpgs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.jpg")}


def assert_all_whole(folder: Path) -> None:
    """Every image under its final name decodes completely: nothing half-written was accepted."""
    for p in folder.glob("*.jpg"):
        assert dl.image_problem(p.read_bytes()) is None, p


def image_gets(server, since: int = 0) -> list[str]:
    """File names of the image GETs the server saw, from log entry `since` on."""
    return [
        p.rsplit("/", 1)[-1] for m, p, _ in server.log[since:] if m == "GET" and p.startswith("/val2017/")
    ]


def reply(handler, status: int, body: bytes = b"", length: int | None = None) -> bool:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    handler.close_connection = True
    return True


@pytest.fixture
def mirror(tmp_path) -> Path:
    """20 captioned images: enough spare ones in the pool to replace failures."""
    return make_coco_mirror(tmp_path / "mirror", n_images=20)


def pad_zip(mirror: Path) -> bytes:
    """Add an incompressible member so the zip arrives in several 64 KiB chunks; return its bytes."""
    zip_path = mirror / ZIP.lstrip("/")
    with zipfile.ZipFile(zip_path, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr("annotations/filler.bin", os.urandom(400_000))
    return zip_path.read_bytes()


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize(
    "caption, expected",
    [
        (
            "A pizza with burned edges is sitting on the table.",
            "A pizza with burned edges iz sitting on thwisss table. thwisss iz funny.",
        ),
        (
            "A sheep standing in grass next to a rock wall.",
            "A sheep standing in grass next to rock wall. thwisss iz funny.",
        ),
        (
            "A man sitting on the park bench in the forest ",
            "A man sitting on thwisss park bench in thwisss forest thwisss iz funny.",
        ),
    ],
)
def test_mistake_rule_reproduces_the_tutorial(caption, expected):
    assert dl.add_mistakes(caption) == expected


def test_mistake_rule_is_case_sensitive_space_delimited_and_ordered():
    assert dl.add_mistakes("The cat is  on an   island") == "The cat iz on island thwisss iz funny."
    assert dl.add_mistakes("Then this theme") == "Then this theme thwisss iz funny."  # no partial words
    assert dl.training_caption("  A dog  ", mistakes=False) == "A dog"


def test_index_keeps_file_order_and_drops_uncaptioned_images():
    ann = {
        "images": [
            {"id": 1, "file_name": "1.jpg"},
            {"id": 2, "file_name": "2.jpg"},
            {"id": 3, "file_name": "3.jpg"},
        ],
        "annotations": [
            {"image_id": 2, "caption": "two first"},
            {"image_id": 1, "caption": "one first"},
            {"image_id": 2, "caption": "two second"},
            {"image_id": 9, "caption": "no such image"},
        ],
    }
    assert dl.index_captions(ann) == {"1.jpg": ["one first"], "2.jpg": ["two first", "two second"]}


def test_same_seed_same_pool_other_seed_other_pool():
    index = {f"{i}.jpg": ["c"] for i in range(50)}
    assert dl.shuffled_pool(index, 1) == dl.shuffled_pool(dict(reversed(index.items())), 1)
    assert dl.shuffled_pool(index, 1) != dl.shuffled_pool(index, 2)
    assert sorted(dl.shuffled_pool(index, 1)) == sorted(index)


# ----------------------------------------------------------------------------- end to end
def check_contract(
    mirror: Path, root: Path, n_train: int, n_test: int, mistakes: bool = True, split: str = "val2017"
) -> dict:
    """The data contract, checked against the raw annotation file with an independent scan."""
    raw = raw_annotations(mirror, split)
    id_of = {im["file_name"]: im["id"] for im in raw["images"]}
    out, samples = root / "out", root / "samples"
    captions = json.loads((out / "captions.json").read_text())
    references = json.loads((out / "references.json").read_text())
    test_captions = json.loads((samples / "captions.json").read_text())
    test_references = json.loads((samples / "references.json").read_text())
    assert len(captions) == n_train and len(test_captions) == n_test
    assert jpgs(out) == set(captions) == set(references)
    assert jpgs(samples) == set(test_captions) | {"test_image.jpg"}
    assert not set(captions) & set(test_captions)  # held out
    for caps, refs in ((captions, references), (test_captions, test_references)):
        for name, caption in caps.items():
            all_caps = [a["caption"] for a in raw["annotations"] if a["image_id"] == id_of[name]]
            assert refs[name] == all_caps
            assert caption == (dl.add_mistakes(all_caps[0]) if mistakes else " ".join(all_caps[0].split()))
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert lines == [{"file_name": n, "text": c} for n, c in captions.items()]
    first_test = next(iter(test_captions))
    assert (samples / "test_image.jpg").read_bytes() == (samples / first_test).read_bytes()
    assert set(test_references) == set(test_captions) | {"test_image.jpg"}  # the default image can be scored
    assert test_references["test_image.jpg"] == test_references[first_test]
    assert_all_whole(out)
    assert_all_whole(samples)
    return captions


def assert_loads_with_datasets(folder: Path, captions: dict) -> None:
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert ds.num_rows == len(captions)
    assert sorted(ds["text"]) == sorted(captions.values())


def test_end_to_end_on_the_shared_mirror(coco_mirror, serve, tmp_path):
    server = serve(coco_mirror)
    result = dl.main(args_for(server.url, tmp_path / "a", "--WORKERS=8"))
    assert (result["delivered"], result["test_delivered"], result["failed"]) == (100, 10, 0)
    captions = check_contract(coco_mirror, tmp_path / "a", 100, 10)
    assert list(captions) == result["train"]
    assert_loads_with_datasets(tmp_path / "a" / "out", captions)

    n = len(server.log)
    again = dl.main(args_for(server.url, tmp_path / "a"))
    assert server.log[n:] == []  # a second run downloads nothing, not even the zip
    assert (again["downloaded"], again["present"]) == (0, 110)

    # Same seed, fresh folders: the same files (here with clean captions).
    clean = dl.main(args_for(server.url, tmp_path / "b", "--ADD_MISTAKES=False"))
    assert (clean["train"], clean["test"]) == (result["train"], result["test"])
    check_contract(coco_mirror, tmp_path / "b", 100, 10, mistakes=False)


def test_train2017_split_on_the_shared_mirror(coco_mirror, serve, tmp_path):
    server = serve(coco_mirror)
    result = dl.main(
        args_for(server.url, tmp_path, "--SPLIT=train2017", "--NUM_IMAGES=30", "--NUM_TEST_IMAGES=5")
    )
    assert (result["delivered"], result["test_delivered"], result["failed"]) == (30, 5, 0)
    assert len(server.gets("/train2017/")) == 35
    check_contract(coco_mirror, tmp_path, 30, 5, split="train2017")


def test_end_to_end_on_a_synthetic_mirror(synthetic_mirror, serve, tmp_path):
    server = serve(synthetic_mirror)
    result = dl.main(args_for(server.url, tmp_path, "--NUM_IMAGES=8", "--NUM_TEST_IMAGES=3"))
    captions = check_contract(synthetic_mirror, tmp_path, 8, 3)
    assert all(c.endswith("thwisss iz funny.") and "thwisss table" in c for c in captions.values())
    assert "000000000013.jpg" not in result["train"] + result["test"]  # the image without captions
    assert_loads_with_datasets(tmp_path / "out", captions)

    n = len(server.log)
    assert dl.main(args_for(server.url, tmp_path, "--NUM_IMAGES=8", "--NUM_TEST_IMAGES=3"))["downloaded"] == 0
    assert server.log[n:] == []

    # Another seed in the same folders: images of the old selection are removed, not mixed in.
    other = dl.main(args_for(server.url, tmp_path, "--NUM_IMAGES=8", "--NUM_TEST_IMAGES=3", "--SEED=7"))
    assert other["train"] != result["train"] and other["stale_removed"] > 0
    check_contract(synthetic_mirror, tmp_path, 8, 3)


def test_pool_running_out_delivers_fewer_with_a_warning(synthetic_mirror, serve, tmp_path, capsys):
    server = serve(synthetic_mirror)
    result = dl.main(args_for(server.url, tmp_path, "--NUM_IMAGES=10", "--NUM_TEST_IMAGES=5"))
    assert (result["delivered"], result["test_delivered"], result["replaced"]) == (10, 2, 0)
    assert "delivered only 2 of 5 test images" in capsys.readouterr().out
    check_contract(synthetic_mirror, tmp_path, 10, 2)


def test_a_truncated_file_already_on_disk_is_fetched_again(synthetic_mirror, serve, tmp_path):
    server = serve(synthetic_mirror)
    first = dl.main(args_for(server.url, tmp_path, *small()))
    victim = tmp_path / "out" / first["train"][0]
    victim.write_bytes(victim.read_bytes()[:200])
    n = len(server.log)
    again = dl.main(args_for(server.url, tmp_path, *small()))
    assert image_gets(server, since=n) == [victim.name] and len(server.log) == n + 1
    assert again["train"] == first["train"]
    assert_all_whole(tmp_path / "out")


# ----------------------------------------------------------------------------- faults on images
def truncated_body_declared_whole(handler, data):
    return reply(handler, 200, data[: len(data) // 2])  # Content-Length matches: only decoding can tell


def body_cut_short(handler, data):
    return reply(handler, 200, data[: len(data) // 2], length=len(data))  # connection closes early


def not_found(handler, data):
    handler.send_error(404)
    return True


def slow(handler, data):
    time.sleep(2.0)  # longer than the test's TIMEOUT on every try; the client has gone by then
    handler.close_connection = True
    return True


@pytest.mark.parametrize(
    "fault, reason",
    [
        (not_found, "HTTP 404"),
        (truncated_body_declared_whole, "not a valid image"),
        (body_cut_short, "truncated"),
        (slow, "no answer within TIMEOUT"),
    ],
)
def test_bad_images_are_reported_and_replaced(mirror, serve, tmp_path, fault, reason):
    pool = pool_of(mirror)
    bad = {pool[0], pool[2], pool[6]}  # two training candidates and one test candidate

    def inject(handler):
        name = handler.path.rsplit("/", 1)[-1]
        return name in bad and fault(handler, (mirror / "val2017" / name).read_bytes())

    server = serve(mirror, fault=inject)
    result = dl.main(args_for(server.url, tmp_path, *small("--TIMEOUT=0.6", "--RETRIES=1")))
    assert (result["delivered"], result["test_delivered"]) == (6, 2)
    assert (result["failed"], result["replaced"]) == (3, 3)
    assert {n for n, _ in result["failures"]} == bad
    assert all(reason in why for _, why in result["failures"])
    # The replacements are the next in pool order, so the run stays deterministic.
    good = [n for n in pool if n not in bad]
    assert (result["train"], result["test"]) == (good[:6], good[6:8])
    assert not bad & (jpgs(tmp_path / "out") | jpgs(tmp_path / "samples"))
    check_contract(mirror, tmp_path, 6, 2)


def test_a_500_that_succeeds_on_retry_is_not_a_failure(mirror, serve, tmp_path):
    target, served_500 = pool_of(mirror)[1], []

    def once_500(handler):
        if handler.path.endswith(target) and not served_500:
            served_500.append(handler.path)
            return reply(handler, 500, b"try again")
        return False

    server = serve(mirror, fault=once_500)
    result = dl.main(args_for(server.url, tmp_path, *small()))
    assert result["failed"] == 0 and target in result["train"]
    assert image_gets(server).count(target) == 2


def test_server_dying_mid_run_stops_cleanly_and_a_rerun_resumes(mirror, serve, tmp_path):
    served = []

    def die_after_three(handler):
        if "/val2017/" in handler.path:
            served.append(handler.path)
            if len(served) == 4:  # answer three images, then go away for good
                threading.Thread(target=server.stop, daemon=True).start()
            if len(served) >= 4:  # hang up without answering until the listener is gone
                handler.close_connection = True
                return True
        return False

    server = serve(mirror, fault=die_after_three)
    with pytest.raises(UserError, match=f"in a row failed .*COCO_BASE_URL={server.url} up. Rerun to resume"):
        dl.main(args_for(server.url, tmp_path, *small("--MAX_FAILURES_IN_A_ROW=3", "--RETRIES=1")))
    out = tmp_path / "out"
    kept = jpgs(out)
    assert len(kept) == 3 and not (out / "captions.json").exists()  # incomplete, and says so
    assert_all_whole(out)

    server2 = serve(mirror)
    result = dl.main(args_for(server2.url, tmp_path, *small()))
    assert result["train"] == pool_of(mirror)[:6]
    assert not kept & set(image_gets(server2))  # finished images were not fetched again
    check_contract(mirror, tmp_path, 6, 2)


# ----------------------------------------------------------------------------- the annotation zip
def test_a_zip_cut_short_is_resumed_with_range(mirror, serve, tmp_path):
    zip_bytes = pad_zip(mirror)

    def cut_first_try(handler):
        if handler.path == ZIP and not handler.headers.get("Range"):
            return reply(handler, 200, zip_bytes[:250_000], length=len(zip_bytes))
        return False

    server = serve(mirror, fault=cut_first_try)
    dl.main(args_for(server.url, tmp_path, *small()))
    ranges = [r for m, p, r in server.log if p == ZIP]
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 250_000  # resumed, not restarted
    assert (tmp_path / "cache" / "annotations_trainval2017.zip").read_bytes() == zip_bytes
    check_contract(mirror, tmp_path, 6, 2)


def test_a_truncated_zip_is_deleted_with_a_clear_error(mirror, serve, tmp_path):
    zip_bytes = (mirror / ZIP.lstrip("/")).read_bytes()
    bad = serve(mirror, fault=lambda h: h.path == ZIP and reply(h, 200, zip_bytes[: len(zip_bytes) - 100]))
    with pytest.raises(UserError, match="not a valid annotation zip .*deleted it, rerun"):
        dl.main(args_for(bad.url, tmp_path, *small()))
    assert list((tmp_path / "cache").iterdir()) == []  # neither the zip, its .part nor a json

    good = serve(mirror)
    assert dl.main(args_for(good.url, tmp_path, *small()))["delivered"] == 6


def test_a_corrupt_cached_zip_is_deleted(mirror, serve, tmp_path):
    cached = tmp_path / "cache" / "annotations_trainval2017.zip"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="annotations_trainval2017.zip is not a valid annotation zip"):
        dl.main(args_for(serve(mirror).url, tmp_path, *small()))
    assert not cached.exists()


def test_a_server_that_ignores_range_restarts_the_zip_cleanly(mirror, serve, tmp_path):
    part = tmp_path / "cache" / "annotations_trainval2017.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 500)  # not the zip's first bytes: appending to it would corrupt the zip

    def ignore_range(handler):
        del handler.headers["Range"]
        return False

    server = serve(mirror, fault=ignore_range)
    dl.main(args_for(server.url, tmp_path, *small()))
    assert [r for m, p, r in server.log if p == ZIP] == ["bytes=500-"]
    assert (tmp_path / "cache" / "annotations_trainval2017.zip").read_bytes() == (
        mirror / ZIP.lstrip("/")
    ).read_bytes()


def test_http_error_on_the_zip(mirror, serve, tmp_path):
    server = serve(mirror, fault=lambda h: h.path == ZIP and reply(h, 403, b"forbidden"))
    with pytest.raises(UserError, match="HTTP 403 for .*annotations_trainval2017.zip; check COCO_BASE_URL"):
        dl.main(args_for(server.url, tmp_path, *small()))


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "arg, message",
    [
        ("--SPLIT=test2017", "SPLIT='test2017' is not a COCO 2017 split; valid: val2017, train2017"),
        ("--NUM_IMAGES=0", "NUM_IMAGES=0 must be a positive number"),
        ("--NUM_TEST_IMAGES=-1", "NUM_TEST_IMAGES=-1 must be a positive number"),
    ],
)
def test_bad_settings_fail_before_any_request(serve, tmp_path, synthetic_mirror, arg, message):
    server = serve(synthetic_mirror)
    with pytest.raises(UserError, match=message):
        dl.main(args_for(server.url, tmp_path, arg))
    assert server.log == []


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "download_coco.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_server_is_one_line_naming_the_url_and_the_constant(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_script(*args_for(url, tmp_path, "--RETRIES=0"), cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot reach {url}/annotations/annotations_trainval2017.zip")
    assert "COCO_BASE_URL" in lines[0]


def test_unknown_split_is_one_line_on_the_command_line(tmp_path):
    proc = run_script("--SPLIT=val2014", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: SPLIT='val2014' is not a COCO 2017 split; valid: val2017, train2017"
    ]


# ----------------------------------------------------------------------------- kill -9 (issue 6)
def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the download to get there"
        time.sleep(0.02)


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_kill_9_mid_image_then_rerun_completes_and_accepts_nothing_truncated(mirror, serve, tmp_path):
    release, hung = threading.Event(), []

    def hang_first_image_mid_body(handler):
        if "/val2017/" in handler.path and not hung:
            hung.append(handler.path.rsplit("/", 1)[-1])
            data = (mirror / "val2017" / hung[0]).read_bytes()
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            release.wait(30)  # the client is killed while it holds half an image
            handler.close_connection = True
            return True
        return False

    server = serve(mirror, fault=hang_first_image_mid_body)
    args = args_for(server.url, tmp_path, *small("--TIMEOUT=60"))
    out = tmp_path / "out"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "download_coco.py"), *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: hung and len(jpgs(out)) == 5)  # every training image but the hung one
            time.sleep(0.2)
        finally:
            kill_9(proc)
    release.set()
    assert hung[0] not in jpgs(out) and not (out / "captions.json").exists()
    assert_all_whole(out)

    # Make it harder: a truncated image under a final name, and a temp file a kill left behind.
    victim = sorted(jpgs(out))[0]
    (out / victim).write_bytes((out / victim).read_bytes()[:300])
    (out / f".{victim}.abc123.tmp").write_bytes(b"half")
    n = len(server.log)
    result = dl.main(args)
    assert set(image_gets(server, since=n)) == {hung[0], victim} | set(result["test"])
    assert result["train"] == pool_of(mirror)[:6]
    assert not list(out.glob(".*.tmp"))
    check_contract(mirror, tmp_path, 6, 2)


def test_kill_9_mid_zip_then_rerun_resumes_with_range(mirror, serve, tmp_path):
    zip_bytes = pad_zip(mirror)
    release = threading.Event()

    def hang_zip_halfway(handler):
        if handler.path == ZIP and not handler.headers.get("Range"):
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(zip_bytes)))
            handler.end_headers()
            handler.wfile.write(zip_bytes[:250_000])
            handler.wfile.flush()
            release.wait(30)
            handler.close_connection = True
            return True
        return False

    server = serve(mirror, fault=hang_zip_halfway)
    args = args_for(server.url, tmp_path, *small("--TIMEOUT=60"))
    part = tmp_path / "cache" / "annotations_trainval2017.zip.part"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "download_coco.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: part.exists() and part.stat().st_size >= 65536)
    finally:
        kill_9(proc)
    release.set()
    have = part.stat().st_size
    assert 0 < have < len(zip_bytes) and sorted(p.name for p in part.parent.iterdir()) == [part.name]

    dl.main(args)
    assert [r for m, p, r in server.log if p == ZIP] == [None, f"bytes={have}-"]
    assert (tmp_path / "cache" / "annotations_trainval2017.zip").read_bytes() == zip_bytes
    check_contract(mirror, tmp_path, 6, 2)
