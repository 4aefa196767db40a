"""Fault suite: kills, Ctrl-C, unwritable or full disks, and nasty inputs, for training and inference.

Everything runs on the tiny BLIP in fp32 on CPU, where training is exactly repeatable, so
"resumed" can be compared with "uninterrupted" tensor for tensor. Nasty files are generated here
(conftest's make_nasty_images / make_nasty_captions) and never committed.
(kill -9 during a download is download_coco.py's own test.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import UserError
from conftest import (
    REPO,
    TRAIN_ENV,
    TRAIN_TOTAL_STEPS,
    assert_same_adapter,
    checkpoint_step,
    make_good_images,
    make_nasty_captions,
    make_nasty_images,
    one_thread,
    train_in_process,
)

ENV = TRAIN_ENV
train = train_in_process


def losses(folder: Path) -> list:
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [(m["type"], m["step"], m.get("loss"), m.get("train_loss"), m.get("val_loss")) for m in rows]


def script(*args):
    return [sys.executable, str(REPO / "train_blip.py"), *args]


def wait_for(predicate, proc, timeout=120.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc={proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def one_error_line(stderr: str) -> str:
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and "Warning" not in line and "warnings.warn" not in line
    ]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base_args(train_args):
    """conftest's shared run: 16 images, batch 2, 18 optimizer steps, a checkpoint every 2 steps."""
    return train_args


@pytest.fixture(scope="module")
def reference(train_reference) -> Path:
    """The uninterrupted run every interrupted one must reproduce exactly (made once per session)."""
    return train_reference


# ----------------------------------------------------------------------------- kill -9 and Ctrl-C
def test_kill_9_mid_training_then_resume_equals_uninterrupted(
    tmp_path, base_args, reference, count_optimizer_steps
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        script(*base_args, f"--OUTPUT_DIR={out}"),
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: any((out / "checkpoints").glob("step-*")), proc, what="the first checkpoint")
        time.sleep(0.3)  # land somewhere in the following steps, possibly inside a checkpoint write
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train_results.json").exists()
    whole = [p.name for p in (out / "checkpoints").glob("step-*")]
    killed_at = max(m[1] for m in losses(out))
    print(f"killed after optimizer step {killed_at}; whole checkpoints: {sorted(whole)}")

    results = train([*base_args, f"--OUTPUT_DIR={out}"])  # RESUME="auto" is the default
    assert results["resumed_from"] and Path(results["resumed_from"]).name in whole
    # Continued, not restarted: a run from scratch would also reach the reference, with 18 steps.
    assert len(count_optimizer_steps) == TRAIN_TOTAL_STEPS - checkpoint_step(results["resumed_from"])
    assert_same_adapter(out, reference)
    assert losses(out) == losses(reference)  # the log, too, is the uninterrupted run's


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_exits_cleanly(
    tmp_path, base_args, reference, count_optimizer_steps
):
    out = tmp_path / "out"
    args = [a for a in base_args if not a.startswith("--NUM_WORKERS")] + [
        "--NUM_WORKERS=1"
    ]  # a worker gets Ctrl-C too
    proc = subprocess.Popen(
        script(*args, f"--OUTPUT_DIR={out}"),
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file(), proc, what="the first logged step")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"
    said = [line for line in stdout.splitlines() if "checkpoint: " in line]
    assert said, stdout[-3000:]
    ckpt = Path(said[-1].split("checkpoint: ", 1)[1].strip())
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert "resume with: python train_blip.py" in stdout
    assert not (out / "train_results.json").exists()
    print(f"Ctrl-C -> {ckpt.name}; message: {said[-1].strip()!r}")

    results = train([*args, f"--OUTPUT_DIR={out}"])
    assert Path(results["resumed_from"]) == ckpt
    assert len(count_optimizer_steps) == TRAIN_TOTAL_STEPS - checkpoint_step(ckpt)
    assert_same_adapter(out, reference)


# ----------------------------------------------------------------------------- unwritable / full disk
def test_unwritable_output_dir_is_a_clear_error_before_training(tmp_path, base_args, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where OUTPUT_DIR needs a folder (chmod does not stop root)")
    with pytest.raises(UserError, match=r"cannot write to .*a_file.*OUTPUT_DIR"):
        train([*base_args, f"--OUTPUT_DIR={blocker / 'out'}"])
    assert "trainable params" not in capsys.readouterr().out  # failed before the model was even loaded
    # The same as a user sees it: one line on stderr, exit code 2, no traceback.
    proc = subprocess.run(
        script(*base_args, f"--OUTPUT_DIR={blocker / 'out'}"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    print(one_error_line(proc.stderr))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, base_args, reference, monkeypatch, count_optimizer_steps
):
    import torch

    out = tmp_path / "out"
    real_save, saves = torch.save, []

    def save(obj, f, *a, **kw):
        # accelerate.save_state writes optimizer.bin, scheduler.bin and the RNG state with torch.save.
        saves.append(str(f))
        if "step-00000004" in str(f):  # the second checkpoint: write half a file, then the disk is full
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
        UserError,
        match=r"could not write checkpoint .*step-00000004 \(No space left on device\); "
        r"the previous checkpoint .*step-00000002 is intact",
    ):
        train([*base_args, f"--OUTPUT_DIR={out}"])
    monkeypatch.setattr(torch, "save", real_save)
    assert any("step-00000004" in s for s in saves)
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["step-00000002"], left  # the half-written one was removed, the whole one kept
    # "Intact" means usable: resuming from it reaches the uninterrupted run's exact weights, in 16 steps.
    count_optimizer_steps.clear()
    results = train([*base_args, f"--OUTPUT_DIR={out}"])
    assert Path(results["resumed_from"]).name == "step-00000002"
    assert len(count_optimizer_steps) == TRAIN_TOTAL_STEPS - 2
    assert_same_adapter(out, reference)


# ----------------------------------------------------------------------------- nasty inputs: training
QUICK = [
    "--EPOCHS=1",
    "--PRECISION=fp32",
    "--NUM_SAMPLE_CAPTIONS=0",
    "--MAX_CAPTION_TOKENS=16",
    "--NUM_WORKERS=0",
    "--LOG_EVERY=1",
]


@pytest.mark.slow
def test_training_skips_nasty_images_by_name_and_trains_on_the_rest(tmp_path, tiny_blip_dir, capsys):
    data = tmp_path / "data"
    captions = make_good_images(data, n=8)
    nasty = make_nasty_images(data)
    captions.update({name: f"a nasty {Path(name).stem.replace('_', ' ')}" for name in nasty})
    (data / "captions.json").write_text(json.dumps(captions))
    start = time.time()
    # One epoch, batch 16, no validation: every usable image goes through the processor once.
    results = train(
        [
            f"--MODEL_ID={tiny_blip_dir}",
            f"--DATA_DIR={data}",
            f"--OUTPUT_DIR={tmp_path / 'out'}",
            "--BATCH_SIZE=16",
            "--VAL_FRACTION=0",
            *QUICK,
        ]
    )
    bad = sorted(n for n, kind in nasty.items() if kind == "bad")
    assert sorted(s["file"] for s in results["skipped"]) == bad
    assert results["n_train"] == len(captions) - len(bad) and results["optimizer_steps"] == 1
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert len(warning) == 1 and all(name in warning[0] for name in bad), warning
    print(f"{time.time() - start:.1f} s; {warning[0]}")


@pytest.fixture(scope="module")
def nasty_captions(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("nasty_captions")
    return make_nasty_captions(folder, make_good_images(folder, n=6))


@pytest.mark.parametrize(
    "case",
    [
        "invalid_json",
        "list_not_mapping",
        "non_string_caption",
        "empty_caption",
        "long_caption",
        "non_utf8",
        "missing_files",
    ],
)
def test_training_on_nasty_captions_json(tmp_path, tiny_blip_dir, nasty_captions, case, capsys):
    data, expect = nasty_captions[case]
    args = [
        f"--MODEL_ID={tiny_blip_dir}",
        f"--DATA_DIR={data}",
        f"--OUTPUT_DIR={tmp_path / 'out'}",
        "--BATCH_SIZE=4",
        "--VAL_FRACTION=0",
        "--MAX_STEPS=1",
        *QUICK,
    ]
    try:
        results = train(args)
    except UserError as e:
        message = str(e)
        assert expect in ("error", "error_or_skip"), f"{case}: unexpected error {message}"
        assert "captions.json" in message and "\n" not in message
        print(f"{case}: error: {message}")
        return
    assert expect != "error", f"{case}: training ran on an invalid captions.json"
    out = capsys.readouterr().out
    if expect in ("skip", "error_or_skip"):
        warning = [line for line in out.splitlines() if line.startswith("warning: skipped")]
        assert len(warning) == 1, out[-2000:]
        if case == "missing_files":
            assert "missing_1.jpg" in warning[0] and "missing_2.jpg" in warning[0]
        print(f"{case}: {warning[0]}")
    assert results["optimizer_steps"] == 1


def test_a_bad_captions_json_is_one_line_on_stderr(tmp_path, tiny_blip_dir):
    data = tmp_path / "data"
    make_good_images(data, n=2)
    (data / "captions.json").write_bytes(b'{"good_00.jpg": "caf\xe9"}')  # Latin-1, not UTF-8
    proc = subprocess.run(
        script(f"--MODEL_ID={tiny_blip_dir}", f"--DATA_DIR={data}", f"--OUTPUT_DIR={tmp_path / 'o'}"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "captions.json" in line and "UTF-8" in line, line


# ----------------------------------------------------------------------------- nasty inputs: inference
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_blip_dir) -> Path:
    """A LoRA adapter on the tiny BLIP in peft's standard format, as train_blip.py saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny_adapter")
    model = get_peft_model(
        BlipForConditionalGeneration.from_pretrained(tiny_blip_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "query", "value"]),
    )
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_inference_skips_nasty_images_by_name_and_captions_the_rest(tmp_path, tiny_adapter, capsys):
    import inference

    images = tmp_path / "images"
    make_good_images(images, n=2)
    nasty = make_nasty_images(images)
    start = time.time()
    with one_thread():
        out = inference.main(
            [
                f"--ADAPTER_DIR={tiny_adapter}",
                f"--IMAGES={images}",
                "--SHOW=never",
                "--NUM_BEAMS=1",
                "--MAX_LENGTH=8",
                "--MIN_LENGTH=1",
                "--PRECISION=fp32",
                f"--RESULTS_PATH={tmp_path / 'results.json'}",
                f"--FIGURE_PATH={tmp_path / 'fig.png'}",
            ]
        )
    bad = sorted(n for n, kind in nasty.items() if kind == "bad")
    ok = sorted([n for n, kind in nasty.items() if kind == "ok"] + ["good_00.jpg", "good_01.jpg"])
    assert sorted(Path(s["file"]).name for s in out["skipped"]) == bad
    assert sorted(r["file"] for r in out["images"]) == ok
    printed = capsys.readouterr().out
    for name in bad:
        assert any(line.startswith("skipped:") and name in line for line in printed.splitlines()), name
    print(f"{time.time() - start:.1f} s; skipped: {bad}")


def test_inference_on_only_bad_images_is_a_clear_error(tmp_path, tiny_adapter):
    import inference

    images = tmp_path / "images"
    nasty = make_nasty_images(images, huge=False)
    for name, kind in nasty.items():
        if kind == "ok":
            (images / name).unlink()
    with pytest.raises(UserError, match="could be read as an image"), one_thread():
        inference.main(
            [
                f"--ADAPTER_DIR={tiny_adapter}",
                f"--IMAGES={images}",
                "--SHOW=never",
                f"--RESULTS_PATH={tmp_path / 'r.json'}",
                f"--FIGURE_PATH={tmp_path / 'f.png'}",
            ]
        )


# ----------------------------------------------------------------------------- decompression bombs
BOMB_PROBE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import common
from transformers import BlipProcessor
processor = BlipProcessor.from_pretrained(sys.argv[2])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report, before = {}, rss()
t = time.time()
try:
    common.open_image(sys.argv[3])
    report["bomb"] = "accepted"
except common.UserError as e:
    report["bomb"] = str(e)
report["bomb_s"], report["bomb_rss_mb"] = time.time() - t, rss() - before
t = time.time()
image = common.open_image(sys.argv[4])
pixels = processor(images=image, return_tensors="pt").pixel_values
report["huge_s"] = time.time() - t
report["huge_peak_rss_mb"] = rss()
report["huge_shape"] = list(pixels.shape)
print(json.dumps(report))
"""


@pytest.mark.slow
def test_bomb_refused_from_its_header_and_10000_squared_fits_in_memory(tmp_path, tiny_blip_dir):
    nasty = make_nasty_images(tmp_path)
    assert nasty["bomb_12000x12000.png"] == "bad" and nasty["huge_10000x10000.png"] == "ok"
    assert (tmp_path / "bomb_12000x12000.png").stat().st_size < 100_000  # a mode-"1" PNG: tiny on disk
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BOMB_PROBE,
            str(REPO),
            str(tiny_blip_dir),
            str(tmp_path / "bomb_12000x12000.png"),
            str(tmp_path / "huge_10000x10000.png"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert "12000x12000 pixels is too large" in report["bomb"]
    assert report["bomb_s"] < 1.0 and report["bomb_rss_mb"] < 50  # header only: nothing decoded
    assert report["huge_shape"] == [1, 3, 64, 64]
    assert report["huge_peak_rss_mb"] < 3000  # 100 M pixels: 0.3 GB as RGB, plus the processor's copies
