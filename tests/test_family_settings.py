"""Settings that keep their meaning for every family: a full fine-tune (USE_LORA=False) in bf16, then
captions from the saved whole model, compared with its base (BASE_MODEL_ID), also in bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import inference
import train_blip
from conftest import make_good_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAMILY_DIRS = [
    "tiny_blip_dir",
    "tiny_git_dir",
    "tiny_blip2_opt_dir",
    "tiny_blip2_t5_dir",
    "tiny_llava_dir",
    "tiny_idefics3_dir",
    "tiny_paligemma_dir",
    "tiny_florence2_dir",
    "tiny_idefics_dir",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("settings_data")
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=4)))
    return folder


@pytest.mark.parametrize("model_fixture", FAMILY_DIRS)
def test_full_fine_tune_in_bf16_trains_saves_and_captions(model_fixture, data_dir, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "full"
    results = train_blip.main(
        [
            f"--MODEL_ID={model_dir}",
            f"--DATA_DIR={data_dir}",
            f"--OUTPUT_DIR={out}",
            "--USE_LORA=False",
            "--PRECISION=bf16",
            "--MAX_STEPS=1",
            "--BATCH_SIZE=2",
            "--VAL_FRACTION=0",
            "--NUM_WORKERS=0",
            "--NUM_SAMPLE_CAPTIONS=0",
            "--MAX_CAPTION_TOKENS=16",
        ]
    )
    assert results["precision"] == "bf16" and results["trainable_params"] == results["total_params"]
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    captions = inference.main(
        [
            f"--ADAPTER_DIR={out}",
            f"--BASE_MODEL_ID={model_dir}",
            f"--IMAGES={data_dir}",
            "--PRECISION=bf16",
            "--MAX_LENGTH=6",
            "--MIN_LENGTH=2",
            "--NUM_BEAMS=1",
            "--SHOW=never",
            "--REFERENCES=None",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
        ]
    )
    assert captions["model"]["dtype"] == "bfloat16" and captions["model"]["kind"] == "full"
    assert len(captions["images"]) == 4 and all("base" in r for r in captions["images"])


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, coco_mirror) -> Path:
    """download_coco.py from the served mirror, once: 8 training and 3 held-out images."""
    import download_coco
    from conftest import Server

    root = tmp_path_factory.mktemp("downloaded")
    server = Server(coco_mirror, None)
    try:
        download_coco.main(
            [
                f"--COCO_BASE_URL={server.url}",
                f"--OUTPUT_DIR={root / 'coco_sample'}",
                f"--SAMPLES_DIR={root / 'samples'}",
                f"--ANNOTATIONS_DIR={root / 'annotations'}",
                "--NUM_IMAGES=8",
                "--NUM_TEST_IMAGES=3",
            ]
        )
    finally:
        server.stop()
    return root


@pytest.mark.parametrize("model_fixture", FAMILY_DIRS)
def test_download_train_caption_and_score(model_fixture, downloaded, tmp_path, request, monkeypatch):
    """The three scripts in order for every family: the default LoRA, then the held-out samples captioned,
    compared with the base and scored against their references (test_image.jpg once). (A random tiny
    model may well caption with special tokens only: the text can be empty; the pipeline is the point.)"""
    monkeypatch.setattr(inference, "java_available", lambda: False)  # the plain tokenizer: seconds, not Java
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "adapter"
    train_blip.main(
        [
            f"--MODEL_ID={model_dir}",
            f"--DATA_DIR={downloaded / 'coco_sample'}",
            f"--OUTPUT_DIR={out}",
            "--MAX_STEPS=2",
            "--BATCH_SIZE=4",
            "--PRECISION=fp32",
            "--NUM_WORKERS=0",
            "--NUM_SAMPLE_CAPTIONS=0",
            "--MAX_CAPTION_TOKENS=24",
        ]
    )
    result = inference.main(
        [
            f"--ADAPTER_DIR={out}",
            f"--IMAGES={downloaded / 'samples'}",
            "--PRECISION=fp32",
            "--MAX_LENGTH=8",
            "--MIN_LENGTH=2",
            "--NUM_BEAMS=1",
            "--SHOW=never",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
        ]
    )
    assert result["model"]["base"] == str(Path(model_dir).resolve())
    assert len(result["images"]) == 4 and all({"fine_tuned", "base"} <= set(r) for r in result["images"])
    assert result["metrics"]["images_scored"] == 3 and set(result["style"]) == {"fine_tuned", "base"}
