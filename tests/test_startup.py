"""Start-up at scale (issue 12, section 2): images are checked from their headers, once.

Covered: the header check reads no pixels of a good JPEG, yet names a cut one at start-up; the
size it reads is PIL's; a rerun checks nothing it checked before and a changed file is checked
again (the list lives in OUTPUT_DIR, never DATA_DIR); an image that passes the header check but
does not decode is skipped by name during training, once, and the run finishes and resumes
exactly; the loss of such a step is the mean over the captions present.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
import train_blip
from conftest import make_nasty_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def corrupt_jpeg(source: Path) -> bytes:
    """A JPEG whose header and end marker are intact but whose frame names an undefined
    quantisation table: PIL opens it and reads its size, and decoding it fails."""
    data = bytearray(source.read_bytes())
    frame = data.find(b"\xff\xc0")
    data[frame + 12] = 3  # the first component's quantisation table: 3 is never defined
    return bytes(data)


def mirror_jpegs(coco_mirror: Path, n: int) -> list[Path]:
    return sorted((coco_mirror / "val2017").glob("*.jpg"))[:n]


def write_data(folder: Path, sources: list[Path]) -> dict[str, str]:
    """Hard links to `sources` (or copies) named img_XX.jpg, and captions.json for them."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for k, src in enumerate(sources):
        name = f"img_{k:02d}.jpg"
        shutil.copyfile(src, folder / name)
        captions[name] = f"a photo with the number {k}"
    (folder / "captions.json").write_text(json.dumps(captions))
    return captions


def args(model_dir, data_dir, out_dir, *extra) -> list[str]:
    return [
        f"--MODEL_ID={model_dir}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={out_dir}",
        "--PRECISION=fp32",
        "--NUM_WORKERS=0",
        "--LOG_EVERY=1",
        "--NUM_SAMPLE_CAPTIONS=0",
        "--MAX_CAPTION_TOKENS=16",
        *extra,
    ]


# ----------------------------------------------------------------------------- the header check
def test_header_check_decodes_no_good_jpeg_and_names_a_cut_one(coco_mirror, tmp_path, monkeypatch):
    sources = mirror_jpegs(coco_mirror, 6)
    captions = write_data(tmp_path / "data", sources)
    cut = sources[0].read_bytes()
    (tmp_path / "data" / "cut.jpg").write_bytes(cut[: len(cut) // 2])  # header intact, body cut
    captions["cut.jpg"] = "a cut photo"
    decoded = []
    real_open = common.open_image
    monkeypatch.setattr(common, "open_image", lambda p: decoded.append(Path(p).name) or real_open(p))
    items, skipped, passed = train_blip.check_images(tmp_path / "data", captions)
    assert decoded == ["cut.jpg"]  # only the JPEG without its end marker is decoded, up front
    assert [n for n, _ in skipped] == ["cut.jpg"] and "truncated" in skipped[0][1]
    assert len(items) == len(passed) == 6


def test_jpeg_size_is_pils(coco_mirror, tmp_path):
    files = sorted((coco_mirror / "val2017").glob("*.jpg"))
    make_nasty_images(tmp_path, huge=False)
    files += [tmp_path / "exif_rotated.jpg", tmp_path / "cmyk.jpg"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(2) == b"\xff\xd8"
            size = train_blip.jpeg_size(fh)
        with Image.open(f) as im:
            assert size == im.size, f.name


def test_rerun_checks_nothing_and_a_changed_file_is_checked_again(coco_mirror, tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    write_data(data, mirror_jpegs(coco_mirror, 5))
    check_file = out / train_blip._CHECK_FILE
    checked = []
    real_check = train_blip.image_problem
    monkeypatch.setattr(train_blip, "image_problem", lambda p: checked.append(Path(p).name) or real_check(p))

    def load():
        checked.clear()
        items, skipped = train_blip.load_dataset(data, 0, 1, log=lambda *_: None, check_file=check_file)
        return len(items), sorted(checked)

    before = sorted(os.listdir(data))
    assert load() == (5, [f"img_{k:02d}.jpg" for k in range(5)])
    assert check_file.is_file() and sorted(os.listdir(data)) == before  # nothing written into DATA_DIR
    assert load() == (5, [])  # a rerun reads no image

    (data / "img_01.jpg").write_bytes((data / "img_04.jpg").read_bytes())  # another size and mtime
    st = os.stat(data / "img_02.jpg")
    os.utime(data / "img_02.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # same size, touched
    (data / "img_03.jpg").write_bytes(b"not an image any more")
    assert load() == (4, ["img_01.jpg", "img_02.jpg", "img_03.jpg"])
    assert load() == (4, ["img_03.jpg"])  # what failed is checked again; what passed is not

    other = tmp_path / "copy_of_data"
    shutil.copytree(data, other, copy_function=os.link)  # same names, sizes and mtimes: another DATA_DIR
    checked.clear()
    train_blip.load_dataset(other, 0, 1, log=lambda *_: None, check_file=check_file)
    assert len(checked) == 5


# ----------------------------------------------------------------------------- decoding fails in training
@pytest.fixture(scope="module")
def bad_at_load(tmp_path_factory, coco_mirror) -> tuple[Path, dict]:
    """12 mirror JPEGs and a cut one (named at start-up); of the 12, one training image and one
    validation image (VAL_FRACTION=0.2, SEED=42) pass the header check but do not decode."""
    data = tmp_path_factory.mktemp("bad_at_load")
    sources = mirror_jpegs(coco_mirror, 12)
    write_data(data, sources)
    train_ids, val_ids = train_blip.split_train_val(12, 0.2, 42)
    bad = {"train": f"img_{train_ids[3]:02d}.jpg", "val": f"img_{val_ids[0]:02d}.jpg"}
    for name in bad.values():
        (data / name).write_bytes(corrupt_jpeg(data / name))
    cut = sources[0].read_bytes()
    (data / "zz_cut.jpg").write_bytes(cut[: len(cut) // 2])
    captions = json.loads((data / "captions.json").read_text()) | {"zz_cut.jpg": "a cut photo"}
    (data / "captions.json").write_text(json.dumps(captions))
    return data, bad


def logged(out_dir: Path) -> list:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["type"], m["step"], m.get("loss"), m.get("train_loss"), m.get("val_loss")) for m in lines]


def test_image_that_fails_to_decode_is_skipped_by_name_and_resume_is_exact(
    tiny_blip_dir, bad_at_load, tmp_path, capsys
):
    from safetensors.torch import load_file

    data, bad = bad_at_load
    common_args = ["--VAL_FRACTION=0.2", "--BATCH_SIZE=2", "--NUM_SAMPLE_CAPTIONS=2"]
    straight = train_blip.main(
        args(tiny_blip_dir, data, tmp_path / "a", "--EPOCHS=2", "--NUM_WORKERS=1", *common_args)
    )
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: skipped")]
    assert warnings[0].startswith("warning: skipped 1 of 13 images: zz_cut.jpg")  # at start-up
    for name in bad.values():  # in training: named once, though it failed in both epochs
        assert len([w for w in warnings if name in w]) == 1, warnings
    assert len(warnings) == 3
    assert straight["epochs"] == 2 and straight["n_train"] + straight["n_val"] == 12
    assert sorted(s["file"] for s in straight["skipped"]) == sorted([*bad.values(), "zz_cut.jpg"])
    epochs = [
        m
        for m in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
        if m["type"] == "epoch"
    ]
    captions = {c["file"]: c["generated"] for c in epochs[-1]["captions"]}
    assert captions[bad["val"]] is None and all(captions[f] for f in captions if f != bad["val"])
    assert (tmp_path / "a" / train_blip._CHECK_FILE).is_file() and straight["first_step_s"] > 0

    first = train_blip.main(args(tiny_blip_dir, data, tmp_path / "b", "--EPOCHS=1", *common_args))
    assert first["epochs"] == 1
    resumed = train_blip.main(args(tiny_blip_dir, data, tmp_path / "b", "--EPOCHS=2", *common_args))
    assert resumed["resumed_from"] and resumed["epochs"] == 2
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (1, 4)])
def test_a_step_with_a_dropped_image_is_the_mean_over_the_captions_present(
    tiny_blip_dir, coco_mirror, tmp_path, batch_size, grad_accum
):
    """One step over 4 images of which one does not decode = one step over the 3 others, in loss and
    gradient norm (Adam's first step hides a scale, the norm does not). With batch 1 x 4 accumulation
    that image's micro-batch is empty: it runs as a zero-weight stand-in."""
    sources = mirror_jpegs(coco_mirror, 4)
    write_data(tmp_path / "with_bad", sources)
    (tmp_path / "with_bad" / "img_02.jpg").write_bytes(corrupt_jpeg(sources[2]))
    three = write_data(tmp_path / "three", [s for k, s in enumerate(sources) if k != 2])
    numbers = [0, 1, 3]  # the same captions as in with_bad
    (tmp_path / "three" / "captions.json").write_text(
        json.dumps({n: f"a photo with the number {k}" for n, k in zip(sorted(three), numbers, strict=True)})
    )
    step = ["--VAL_FRACTION=0", "--MAX_STEPS=1", "--LORA_DROPOUT=0.0", "--LR=1e-3"]
    train_blip.main(
        args(
            tiny_blip_dir,
            tmp_path / "with_bad",
            tmp_path / "a",
            *step,
            f"--BATCH_SIZE={batch_size}",
            f"--GRAD_ACCUM={grad_accum}",
        )
    )
    train_blip.main(args(tiny_blip_dir, tmp_path / "three", tmp_path / "b", *step, "--BATCH_SIZE=3"))
    a, b = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in "ab")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sample_captions_leave_out_an_image_that_does_not_decode(tiny_blip_dir, coco_mirror, tmp_path):
    import families

    good = mirror_jpegs(coco_mirror, 1)[0]
    (tmp_path / "bad.jpg").write_bytes(corrupt_jpeg(good))
    family = families.load(str(tiny_blip_dir))
    model = family.load_model(str(tiny_blip_dir))
    texts = train_blip.sample_captions(family, model, [good, tmp_path / "bad.jpg"], 8)
    assert isinstance(texts[0], str) and texts[1] is None
    assert train_blip.sample_captions(family, model, [tmp_path / "bad.jpg"], 8) == [None]


def test_corrupt_jpeg_passes_the_header_check_and_fails_to_decode(coco_mirror, tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(corrupt_jpeg(mirror_jpegs(coco_mirror, 1)[0]))
    assert train_blip.image_problem(path) is None
    with pytest.raises(common.UserError, match="not a readable image"):
        common.open_image(path)


# ----------------------------------------------------------------------------- two processes
def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    lines = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return [(m["step"], m["loss"]) for m in lines if m["type"] == "train"]


def test_two_processes_with_an_image_that_fails_to_decode_match_one_process(
    tiny_blip_dir, coco_mirror, tmp_path
):
    """torchrun, 2 processes x batch 1 = 1 process x batch 2. The process whose micro-batch holds only
    the image that fails to decode runs the zero-weight stand-in, so the other one's gradient
    all-reduce completes (without it the run hangs); both take the mean over the captions present."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO, free_port

    sources = mirror_jpegs(coco_mirror, 4)
    write_data(tmp_path / "data", sources)
    (tmp_path / "data" / "img_01.jpg").write_bytes(corrupt_jpeg(sources[1]))
    run_args = ["--VAL_FRACTION=0", "--EPOCHS=1", "--LORA_DROPOUT=0.0", "--LR=1e-3"]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "train_blip.py"),
        *args(tiny_blip_dir, tmp_path / "data", tmp_path / "two", *run_args, "--BATCH_SIZE=1"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert two["optimizer_steps"] == 2 and len(set(two["trainable_digest_per_process"])) == 1
    assert [s["file"] for s in two["skipped"]] == ["img_01.jpg"]
    train_blip.main(args(tiny_blip_dir, tmp_path / "data", tmp_path / "one", *run_args, "--BATCH_SIZE=2"))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    one_losses, two_losses = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in one_losses] == [s for s, _ in two_losses] == [1, 2]
    assert [x for _, x in one_losses] == pytest.approx([x for _, x in two_losses], rel=1e-5)
