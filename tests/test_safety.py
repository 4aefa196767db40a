"""Issue 11 (inference.py and common.py): never write or delete outside what a script owns, no hangs,
no silent wrong results. Each test reproduces one item of the issue on the old code.

- MERGE_TO replaces only an earlier export of inference.py (it carries a marker), never the base
  model's, the adapter's or the current folder; the results are written before the export.
- A damaged adapter gives a one-line error that says what is damaged.
- The configurator accepts None only where a script documents it, and survives any literal.
- Atomic writes keep normal file permissions.
- A glob over a symlink loop returns at once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import common
import download_coco
import families
import inference
import train_blip
from common import UserError
from conftest import REPO

ADAPTER_TARGETS = [t for t in families.Blip.lora_targets if t.startswith("vision_model")]
FAST = [
    "--PRECISION=fp32",
    "--MAX_LENGTH=8",
    "--NUM_BEAMS=1",
    "--REFERENCES=None",
    "--SHOW=never",
    "--COMPARE_BASE=False",
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_blip_dir) -> Path:
    """An untrained LoRA adapter on the conftest tiny BLIP (its weights do not matter here)."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    config = LoraConfig(r=4, target_modules=ADAPTER_TARGETS)
    model = get_peft_model(families.load(str(tiny_blip_dir)).load_model(str(tiny_blip_dir)), config)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "red.jpg"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


def run(tmp_path, adapter, image, *args):
    outputs = [f"--RESULTS_PATH={tmp_path / 'r.json'}", f"--FIGURE_PATH={tmp_path / 'f.png'}"]
    return inference.main([f"--ADAPTER_DIR={adapter}", f"--IMAGES={image}", *FAST, *outputs, *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- A: MERGE_TO
def test_merge_to_refuses_folders_it_does_not_own_before_loading(
    tmp_path, tiny_blip_dir, adapter_dir, image, monkeypatch
):
    """Old code: any folder with a config.json (the base model's own) was deleted and replaced."""

    def no_model(*a, **k):
        raise AssertionError("the model must not load before MERGE_TO is checked")

    monkeypatch.setattr(inference, "load_captioner", no_model)
    foreign = tmp_path / "someone_elses_model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "empty_cwd").mkdir()
    cases = {
        str(tiny_blip_dir): "overlaps the base model's folder",
        str(tiny_blip_dir / "inside"): "overlaps the base model's folder",
        str(adapter_dir): "overlaps ADAPTER_DIR",
        str(adapter_dir.parent): "overlaps ADAPTER_DIR",  # a folder around the adapter
        str(foreign): "not a model folder exported by inference.py",
        str(tmp_path / "out"): "overlaps RESULTS_PATH",  # the results would be inside the export
    }
    before = {d: snapshot(d) for d in (tiny_blip_dir, adapter_dir, foreign)}
    for target, message in cases.items():
        results = tmp_path / "out" / "r.json" if target.endswith("out") else tmp_path / "r.json"
        with pytest.raises(UserError, match=f"MERGE_TO=.*{message}"):
            run(tmp_path, adapter_dir, image, f"--MERGE_TO={target}", f"--RESULTS_PATH={results}")
    monkeypatch.chdir(tmp_path / "empty_cwd")  # old code: accepted, then crashed after all the captioning
    with pytest.raises(UserError, match="MERGE_TO='.' is the current or root folder"):
        run(tmp_path, adapter_dir, image, "--MERGE_TO=.")
    assert {d: snapshot(d) for d in before} == before


def test_merge_to_replaces_only_its_own_export(tmp_path, adapter_dir, image):
    target = tmp_path / "merged"
    run(tmp_path, adapter_dir, image, f"--MERGE_TO={target}")
    marker = json.loads((target / inference._MERGE_MARKER).read_text())
    assert marker["adapter_dir"] == str(adapter_dir.resolve()) and "config.json" in marker["files"]
    first = (target / "model.safetensors").stat().st_ino
    # A folder named like the old fixed temp name belongs to the user: never removed.
    (tmp_path / ".merged.tmp").mkdir()
    (tmp_path / ".merged.tmp" / "mine.txt").write_text("keep")
    out = run(tmp_path, adapter_dir, image, f"--MERGE_TO={target}")  # an earlier export: replaced
    assert out["merged_to"] == str(target) and (target / "model.safetensors").stat().st_ino != first
    assert (tmp_path / ".merged.tmp" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")) == [".merged.tmp"]
    (target / "notes.txt").write_text("my notes")  # the user added a file: no longer ours to replace
    with pytest.raises(UserError, match="holds 'notes.txt', which inference.py did not write"):
        run(tmp_path, adapter_dir, image, f"--MERGE_TO={target}")
    assert (target / "notes.txt").read_text() == "my notes"


def test_failed_export_keeps_the_results(tmp_path, adapter_dir, image, monkeypatch):
    """Old code: the export ran before the results were written, so a full disk lost them all."""
    from transformers import BlipForConditionalGeneration

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(BlipForConditionalGeneration, "save_pretrained", disk_full)
    with pytest.raises(UserError, match=r"could not save the merged .*No space left.*captions are saved"):
        run(tmp_path, adapter_dir, image, f"--MERGE_TO={tmp_path / 'merged'}")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["images"][0]["file"] == image.name and saved["merged_to"] is None
    assert (tmp_path / "f.png").is_file()
    assert not [p.name for p in tmp_path.iterdir() if "merged" in p.name]  # no temp folder left behind


# ----------------------------------------------------------------------------- B: damaged adapters
def damaged_copy(adapter_dir: Path, tmp_path: Path, name: str, **config_changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize("cut", [5, 1000, -10], ids=["header", "body", "last_bytes"])
def test_truncated_adapter_weights(tmp_path, adapter_dir, image, cut):
    folder = damaged_copy(adapter_dir, tmp_path, "cut")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(UserError, match=r"adapter_model.safetensors is damaged \(.+\); rerun train_blip.py"):
        run(tmp_path, folder, image)


@pytest.mark.parametrize(
    "change",
    [{"r": "sixteen"}, {"r": -1}, {"lora_alpha": "x"}, {"lora_dropout": 2}, {"target_modules": 5}],
    ids=lambda c: next(iter(c)),
)
def test_invalid_adapter_config_values(tmp_path, adapter_dir, image, change, monkeypatch):
    monkeypatch.setattr(inference, "load_base", lambda *a: pytest.fail("checked before the model loads"))
    folder = damaged_copy(adapter_dir, tmp_path, "bad", **change)
    key, value = next(iter(change.items()))
    with pytest.raises(UserError, match=re.escape(f"adapter_config.json is invalid ({key}={value!r})")):
        run(tmp_path, folder, image)


def test_unknown_peft_type_is_an_invalid_config(tmp_path, adapter_dir, image):
    folder = damaged_copy(adapter_dir, tmp_path, "bad", peft_type="NOPE")
    with pytest.raises(UserError, match=r"adapter_config.json is invalid \('NOPE'\)"):
        run(tmp_path, folder, image)


def test_missing_target_modules_name_one_and_hint_only_for_another_base(
    tmp_path, adapter_dir, tiny_blip_dir, image
):
    folder = damaged_copy(adapter_dir, tmp_path, "targets", target_modules=["not_a_layer"])
    with pytest.raises(UserError, match="targets modules that are not in the base .*'not_a_layer'") as own:
        run(tmp_path, folder, image)
    assert "BASE_MODEL_ID" not in str(own.value)  # it is the adapter's own base: no other base would help
    other = shutil.copytree(tiny_blip_dir, tmp_path / "other_base")
    with pytest.raises(UserError, match="'not_a_layer'.*set --BASE_MODEL_ID to the model it was trained on"):
        run(tmp_path, folder, image, f"--BASE_MODEL_ID={other}")


def test_adapter_without_weights(tmp_path, adapter_dir, image):
    folder = damaged_copy(adapter_dir, tmp_path, "noweights")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        run(tmp_path, folder, image)


# ----------------------------------------------------------------------------- C: configurator
def documents_none(module, name: str) -> bool:
    """Whether the constant's line comment in the script says what None means."""
    source = Path(module.__file__).read_text()
    line = re.search(rf"^{name} = .*$", source, re.MULTILINE).group(0)
    return "#" in line and re.search(r"\bNone\b", line.split("#", 1)[1]) is not None


@pytest.mark.parametrize("module", [inference, download_coco, train_blip], ids=lambda m: m.__name__)
def test_none_only_where_the_default_is_none_or_documented(module):
    """Old code: --OUTPUT_DIR=None, --LR=None, --BATCH_SIZE=None... were accepted and crashed later."""
    defaults = common.defaults_of(vars(module))
    for name, default in defaults.items():
        if default is None or documents_none(module, name):
            assert common.configure(vars(module), [f"--{name}=None"])[name] is None, name
        else:
            with pytest.raises(UserError, match=f"--{name}=None: {name} cannot be None"):
                common.configure(vars(module), [f"--{name}=None"])


def test_typed_settings_named_in_the_issue_refuse_none():
    named = [
        (download_coco, "OUTPUT_DIR"),
        (download_coco, "TIMEOUT"),
        (download_coco, "NUM_IMAGES"),
        (train_blip, "LR"),
        (train_blip, "BATCH_SIZE"),
        (inference, "ADAPTER_DIR"),
    ]
    for module, name in named:
        with pytest.raises(UserError, match="cannot be None"):
            common.configure(vars(module), [f"--{name}=None"])


LITERALS = {
    "recursion": "-" * 5000 + "1",
    "recursion2": "~" * 5000 + "1",
    "nesting": "[" * 5000,
    "unhashable": "{[]: 1}",
    "huge_int": "1" + "0" * 400,
    "inf": "1e999",
}


@pytest.mark.parametrize("text", LITERALS.values(), ids=LITERALS.keys())
def test_any_literal_gives_a_one_line_error(text):
    """Old code: RecursionError / TypeError / OverflowError tracebacks; inf was accepted."""
    with pytest.raises(UserError, match=r"--LR=.*expected (float|a finite number)") as error:
        common.configure({"LR": 3e-5}, [f"--LR={text}"])
    assert len(str(error.value)) < 200 and "\n" not in str(error.value)
    assert common.configure({"NAME": "x"}, [f"--NAME={text}"])["NAME"]  # a string setting takes it as text


# ----------------------------------------------------------------------------- D: permissions
@pytest.fixture
def umask():
    before = os.umask(0o022)
    os.umask(before)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(before)


def test_atomic_writes_keep_normal_permissions(tmp_path, umask):
    """Old code: mkstemp's 0600 on every file. A new file follows the umask; an existing file keeps
    the mode its owner gave it (a private 0600 file stays private)."""
    umask(0o022)
    assert common.current_umask() == 0o022
    common.atomic_write_json(tmp_path / "new.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
    umask(0o027)
    common.atomic_write_bytes(tmp_path / "group.bin", b"x")
    assert stat.S_IMODE((tmp_path / "group.bin").stat().st_mode) == 0o640
    umask(0o022)
    (tmp_path / "private.json").write_text("{}")
    os.chmod(tmp_path / "private.json", 0o600)
    common.atomic_write_json(tmp_path / "private.json", {"b": 2})
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "private.json").read_text()) == {"b": 2}


# ----------------------------------------------------------------------------- E: symlink loops
def test_glob_over_a_symlink_loop_returns_at_once(tmp_path):
    """Old code: glob.glob('dir/**/*.jpg', recursive=True) follows dir/sub/up -> dir forever.
    Run in a subprocess, so a regression is killed after the timeout instead of spinning on."""
    from PIL import Image

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.jpg", "sub/b.jpg", "sub/.hidden.jpg"):
        Image.new("RGB", (8, 8)).save(root / rel)
    (root / "sub" / "up").symlink_to(root)  # a loop through the parent
    (root / "self").symlink_to(".")  # and one onto itself
    code = (
        "import json, sys, inference; print(json.dumps([str(p) for p in inference.find_images(sys.argv[1])]))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, f"{root}/**/*.jpg"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("find_images hung on a symlink loop")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]
    assert inference.find_images(f"{root}/**") == [root / "a.jpg", root / "sub" / "b.jpg"]
    assert inference.find_images(f"{root}/*/*.jpg") == [root / "self" / "a.jpg", root / "sub" / "b.jpg"]
