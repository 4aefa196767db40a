"""train_blip.py never writes, reads or deletes outside what it owns, and never saves a silent wrong result
(issue 11, the training items): plain names in captions.json, no links out of DATA_DIR, no clobbering of
an OUTPUT_DIR it did not write, one run per OUTPUT_DIR, damaged checkpoints named and skipped, and no
NaN adapter. Most runs start from a copy of conftest's finished reference run (train_reference).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import train_blip
from common import UserError
from conftest import (
    REPO,
    TRAIN_ENV,
    TRAIN_TOTAL_STEPS,
    adapter_tensors,
    assert_same_adapter,
    checkpoint_step,
    make_good_images,
    snapshot,
    train_in_process,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

QUICK = [
    "--EPOCHS=1",
    "--BATCH_SIZE=4",
    "--VAL_FRACTION=0",
    "--MAX_STEPS=1",
    "--PRECISION=fp32",
    "--NUM_SAMPLE_CAPTIONS=0",
    "--MAX_CAPTION_TOKENS=16",
    "--NUM_WORKERS=0",
    "--LOG_EVERY=1",
]


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


def logged(folder: Path) -> list:
    """The losses of metrics.jsonl (not its timings)."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [(m["type"], m["step"], m.get("loss"), m.get("train_loss"), m.get("val_loss")) for m in rows]


def checkpoint_warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: checkpoint")]


@pytest.fixture
def finished(tmp_path, train_reference) -> Path:
    """A copy of the finished reference run's OUTPUT_DIR (checkpoints step-16 and step-18), without its
    final outputs, so whatever a run writes there is its own."""
    out = tmp_path / "out"
    shutil.copytree(train_reference, out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json"):
        (out / name).unlink()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000016", "step-00000018"]
    return out


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading the model an error: a check that must come first cannot pass by failing later."""

    def refuse(*_):
        raise AssertionError("the model was loaded: the check came too late (or never)")

    monkeypatch.setattr(train_blip, "build_model", refuse)


# ----------------------------------------------------------------------------- 1: names in captions.json
@pytest.mark.parametrize("name", ["../x.jpg", "/etc/passwd", "sub/a.jpg", "..", "a\\b.jpg"])
def test_a_captions_key_that_is_not_a_plain_name_is_one_error(
    tmp_path, tiny_blip_dir, name, no_model_loading
):
    data = tmp_path / "data"
    captions = make_good_images(data, n=4)
    (tmp_path / "x.jpg").write_bytes((data / "good_00.jpg").read_bytes())  # what "../x.jpg" would read
    (data / "sub").mkdir()
    (data / "sub" / "a.jpg").write_bytes((data / "good_00.jpg").read_bytes())
    (data / "captions.json").write_text(json.dumps({**captions, name: "a stolen file"}))
    with pytest.raises(UserError) as e:
        train_in_process(
            [f"--MODEL_ID={tiny_blip_dir}", f"--DATA_DIR={data}", f"--OUTPUT_DIR={tmp_path / 'o'}", *QUICK]
        )
    assert f"{name!r} is not a plain file name in DATA_DIR" in one_line(e)


def test_a_link_out_of_data_dir_is_skipped_by_name_and_never_read(
    tmp_path, tiny_blip_dir, monkeypatch, capsys
):
    data = tmp_path / "data"
    captions = make_good_images(data, n=4)
    secret = tmp_path / "private" / "holiday.jpg"  # a real image outside DATA_DIR: it would decode fine
    secret.parent.mkdir()
    secret.write_bytes((data / "good_01.jpg").read_bytes())
    (data / "escape.jpg").symlink_to(secret)
    (data / "inside.jpg").symlink_to(data / "good_02.jpg")  # a link that stays inside is fine
    (data / "captions.json").write_text(
        json.dumps({**captions, "escape.jpg": "a link out", "inside.jpg": "a link in"})
    )
    opened = []
    real_open = common.open_image
    monkeypatch.setattr(
        common, "open_image", lambda path, *a, **k: opened.append(Path(path)) or real_open(path, *a, **k)
    )
    results = train_in_process(
        [f"--MODEL_ID={tiny_blip_dir}", f"--DATA_DIR={data}", f"--OUTPUT_DIR={tmp_path / 'o'}", *QUICK]
    )
    assert results["skipped"] == [{"file": "escape.jpg", "reason": "a link to a file outside DATA_DIR"}]
    assert results["n_train"] == 5
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert warnings == ["warning: skipped 1 of 6 images: escape.jpg (a link to a file outside DATA_DIR)"]
    assert opened, "the images were never opened: the spy is not on the path training takes"
    outside = [p for p in opened if p.resolve().parent != data.resolve()]
    assert not outside, f"read outside DATA_DIR: {outside}"


# ----------------------------------------------------------------------------- 3: never clobber OUTPUT_DIR
def test_a_folder_we_did_not_write_is_refused_and_left_as_it_was(tmp_path, train_args, no_model_loading):
    out = tmp_path / "my_project"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    (out / "config.json").write_text('{"mine": true}\n')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.txt").write_text("mine too\n")
    before = snapshot(out)
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={out}", "--RESUME=None"])
    assert one_line(e) == (
        f"OUTPUT_DIR={str(out)!r} holds files that train_blip.py did not write "
        "(no training_config.json); choose an empty or new folder"
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in out.rglob("*")) == ["README.md", "checkpoints", "config.json", "keep.txt"]


@pytest.mark.parametrize(
    "where", ["model folder", "model folder with our marker", "inside the model folder", "data folder"]
)
def test_output_dir_overlapping_the_model_or_data_is_refused(
    tmp_path, tiny_blip_dir, train_data, where, no_model_loading
):
    model = tmp_path / "model"
    shutil.copytree(tiny_blip_dir, model)
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    if where == "model folder with our marker":  # e.g. an earlier full fine-tune's output, now the base
        (model / "training_config.json").write_text("{}\n")
    out = {"inside the model folder": model / "run", "data folder": data}.get(where, model)
    before = snapshot(model), snapshot(data)
    with pytest.raises(UserError) as e:
        train_in_process([f"--MODEL_ID={model}", f"--DATA_DIR={data}", *QUICK, f"--OUTPUT_DIR={out}"])
    constant = "DATA_DIR" if where == "data folder" else "MODEL_ID"
    assert f"OUTPUT_DIR={str(out)!r} overlaps {constant}=" in one_line(e)
    assert (snapshot(model), snapshot(data)) == before
    assert not (model / "run").exists()


def test_resume_none_in_an_earlier_run_removes_only_our_checkpoints(
    finished, train_args, capsys, count_optimizer_steps
):
    ckpt = finished / "checkpoints"
    (ckpt / "notes.txt").write_text("the user's own file\n")
    (ckpt / "best").mkdir()
    (ckpt / "best" / "model.safetensors").write_bytes(b"the user's copy")
    (ckpt / "step-by-step").mkdir()  # named like ours, but not a checkpoint (no trainer_state.json)
    (ckpt / "step-by-step" / "howto.md").write_text("mine\n")
    users = {k: v for k, v in snapshot(ckpt).items() if not k.startswith("step-0")}
    results = train_in_process([*train_args, f"--OUTPUT_DIR={finished}", "--RESUME=None", "--MAX_STEPS=2"])
    assert "RESUME=None: starting fresh; removing old checkpoints" in capsys.readouterr().out
    assert results["resumed_from"] is None and len(count_optimizer_steps) == 2  # the folder was accepted
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "notes.txt", "step-00000002", "step-by-step"]
    assert {k: v for k, v in snapshot(ckpt).items() if not k.startswith("step-0")} == users


# ----------------------------------------------------------------------------- 5: one run per OUTPUT_DIR
def test_a_second_run_on_a_busy_output_dir_fails_at_once_and_the_first_finishes(
    tmp_path, train_args, train_reference, no_model_loading
):
    out = tmp_path / "out"
    # Two of the reference's three epochs: the second reads back what the first put in the disk cache.
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train_blip.py"),
            *train_args,
            f"--OUTPUT_DIR={out}",
            "--PREFIX_CACHE=disk",
            "--EPOCHS=2",
        ],
        env=TRAIN_ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file():  # LOG_EVERY=1: the first step is done
            if first.poll() is not None:
                pytest.fail(f"the first run ended early:\n{first.communicate()[1][-3000:]}")
            assert time.time() < deadline, "the first run logged no step in 120 s"
            time.sleep(0.05)
        assert (out / ".prefix_cache-rank0.bin").is_file()
        started = time.time()
        with pytest.raises(UserError) as e:
            train_in_process([*train_args, f"--OUTPUT_DIR={out}", "--PREFIX_CACHE=disk"])
        seconds = time.time() - started
        assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert one_line(e) == (
        f"OUTPUT_DIR={str(out)!r} is in use by another run "
        f"(train_blip.py pid {first.pid}); wait for it, or choose another OUTPUT_DIR"
    )
    assert seconds < 10
    assert first.returncode == 0, stderr[-3000:]
    # Unharmed: its disk prefix cache was not truncated under it, so its losses are the reference's.
    assert json.loads((out / "train_results.json").read_text())["prefix_cache"] == "disk"
    assert logged(out) == [row for row in logged(train_reference) if row[1] <= 12]
    assert not (out / ".prefix_cache-rank0.bin").exists()


# ----------------------------------------------------------------------------- 9/12: damaged checkpoints
def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_config(path: Path):
    state = json.loads(path.read_text())
    del state["config"]
    path.write_text(json.dumps(state))


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", _truncate, "model.safetensors is unreadable"),
    "missing optimizer.bin": ("optimizer.bin", Path.unlink, "optimizer.bin is missing or unreadable"),
    "damaged random_states_0.pkl": (
        "random_states_0.pkl",
        lambda p: p.write_bytes(b"not a pickle"),
        "random_states_0.pkl is missing or unreadable",
    ),
    "invalid trainer_state.json": (
        "trainer_state.json",
        lambda p: p.write_text('{"epoch": 3,'),
        "trainer_state.json is unreadable (JSONDecodeError",
    ),
    "trainer_state.json without config": (
        "trainer_state.json",
        _drop_config,
        "trainer_state.json is unreadable (KeyError: 'config')",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes_exactly(
    finished, train_args, train_reference, damage, capsys, count_optimizer_steps
):
    name, spoil, problem = DAMAGE[damage]
    newest = finished / "checkpoints" / "step-00000018"
    spoil(newest / name)
    results = train_in_process([*train_args, f"--OUTPUT_DIR={finished}"])
    warnings = checkpoint_warnings(capsys)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: checkpoint {newest} is damaged ({problem}"), warnings
    assert warnings[0].endswith("; using the previous one, step-00000016")
    assert checkpoint_step(results["resumed_from"]) == 16
    assert len(count_optimizer_steps) == TRAIN_TOTAL_STEPS - 16  # continued from it, not restarted
    assert_same_adapter(finished, train_reference)
    assert logged(finished) == logged(train_reference)


def test_the_previous_checkpoint_is_really_loaded(
    finished, train_args, train_reference, count_optimizer_steps
):
    """The control: alter the fallback checkpoint's weights, and the run must end differently."""
    from safetensors.torch import load_file, save_file

    (finished / "checkpoints" / "step-00000018" / "optimizer.bin").unlink()
    weights_path = finished / "checkpoints" / "step-00000016" / "model.safetensors"
    weights = load_file(weights_path)
    key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[key] += 1e-3
    save_file(weights, weights_path, metadata={"format": "pt"})
    results = train_in_process([*train_args, f"--OUTPUT_DIR={finished}"])
    assert checkpoint_step(results["resumed_from"]) == 16 and len(count_optimizer_steps) == 2
    ours, reference = adapter_tensors(finished), adapter_tensors(train_reference)
    changed = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert changed, "the altered checkpoint made no difference: it was not loaded"


def test_every_checkpoint_damaged_is_one_error(finished, train_args, capsys):
    for ckpt in (finished / "checkpoints").iterdir():
        (ckpt / "optimizer.bin").unlink()
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={finished}"])
    assert one_line(e) == (
        f"every checkpoint in {finished / 'checkpoints'} is damaged (see above); "
        "rerun with --RESUME=None to start fresh"
    )
    warnings = checkpoint_warnings(capsys)
    assert [w.split()[2] for w in warnings] == [
        str(finished / "checkpoints" / f"step-000000{s}") for s in (18, 16)
    ]
    assert not (finished / "adapter_model.safetensors").exists()


def test_a_checkpoint_refuses_a_different_number_of_processes(finished, train_args):
    path = finished / "checkpoints" / "step-00000018" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "world_size": 2}))
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={finished}"])
    assert "made with different settings (number of processes (2 -> 1))" in one_line(e)
    assert "--RESUME=None" in str(e.value)


# ----------------------------------------------------------------------------- 10: no NaN adapter
@pytest.mark.parametrize("lr", ["1e999", "nan", "0", "-1", "-1e-5"])
def test_a_non_finite_or_non_positive_lr_is_refused_before_anything(
    tmp_path, train_args, lr, no_model_loading
):
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={out}", f"--LR={lr}"])
    assert "LR" in one_line(e)
    assert not out.exists()  # refused before the output folder was even made


@pytest.fixture
def nan_at_third_step(monkeypatch):
    """caption_loss gives NaN from its third training call on (batch 2, no accumulation: optimizer step 3
    of the run); validation calls (no gradients) are left alone."""
    real, calls = train_blip.caption_loss, []

    def loss(*args, **kwargs):
        losses = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 3:
                return losses * math.nan
        return losses

    monkeypatch.setattr(train_blip, "caption_loss", loss)


def test_a_nan_loss_stops_the_run_and_saves_no_adapter(tmp_path, train_args, nan_at_third_step):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={out}"])
    assert one_line(e).startswith("the loss became nan at optimizer step 3: training diverged. Lower LR")
    assert not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    saved = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


def test_a_nan_loss_never_overwrites_a_good_adapter(tmp_path, train_reference, train_args, nan_at_third_step):
    out = tmp_path / "out"
    shutil.copytree(train_reference, out)
    before = snapshot(out)
    # Train the finished run for a 4th epoch: it diverges at its third step, global step 21.
    with pytest.raises(UserError) as e:
        train_in_process([*train_args, f"--OUTPUT_DIR={out}", "--EPOCHS=4"])
    assert "the loss became nan at optimizer step 21" in one_line(e)
    after = snapshot(out)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "train_results.json",
        "training_config.json",
        "checkpoints/step-00000018/model.safetensors",
    ):
        assert after[name] == before[name], name
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000018", "step-00000020"]  # 20: before the NaN
