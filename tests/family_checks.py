"""Shared checks for the prompted families (tests/test_family_paligemma.py, _florence2.py, _idefics.py):
each test file builds its tiny model (conftest) and calls these with its own hand-computed loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import families
import inference
import train_blip
from conftest import make_good_images

TRAIN = [
    "--PRECISION=fp32",
    "--NUM_WORKERS=0",
    "--NUM_SAMPLE_CAPTIONS=1",
    "--MAX_CAPTION_TOKENS=16",
    "--LOG_EVERY=1",
    "--BATCH_SIZE=2",
    "--VAL_FRACTION=0.25",
]
CAPTION = ["--PRECISION=fp32", "--MAX_LENGTH=12", "--MIN_LENGTH=2", "--NUM_BEAMS=1", "--SHOW=never"]


def make_data(folder: Path) -> Path:
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=8)))
    return folder


def captions_and_images(data_dir: Path, n: int = 4):
    """n (caption, PIL image) pairs, every other caption longer, so that batches have padding."""
    from PIL import Image

    captions = json.loads((data_dir / "captions.json").read_text())
    names = sorted(captions)[:n]
    texts = [captions[x] + " and more words" * (i % 2) for i, x in enumerate(names)]
    return texts, [Image.open(data_dir / x).convert("RGB") for x in names]


def batch_of(family, data_dir: Path, n: int = 4) -> dict:
    """A real batch through the family's tokenize, pixel_values and collate (what training feeds)."""
    texts, images = captions_and_images(data_dir, n)
    ids = family.tokenize(texts, 16)
    pixels = family.pixel_values(images)
    return family.collate(
        [
            {"index": i, "input_ids": t, "pixel_values": p}
            for i, (t, p) in enumerate(zip(ids, pixels, strict=True))
        ]
    )


def hand_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one caption: logits[t] predicts targets[t]."""
    return -F.log_softmax(logits.float(), -1).gather(1, targets[:, None]).mean()


def nonzero_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero, which would leave every A without gradient


def check_every_adapter_gets_a_gradient(family, model, data_dir: Path, must_not_contain=("vision",)):
    """The default targets (LORA_TARGET_MODULES='auto') are the language model's attention only, and
    each of their parameters gets a nonzero gradient from one batch."""
    cfg = dict(train_blip.common.defaults_of(vars(train_blip)), LORA_DROPOUT=0.0)
    peft_model = train_blip.apply_lora(model, family, cfg, "tiny", log=lambda *_: None)
    try:
        names = train_blip.trainable_names(peft_model)
        assert names and not [n for n in names if any(w in n for w in must_not_contain)], sorted(names)
        nonzero_lora_b(peft_model)
        train_blip.CaptionModel(peft_model, family, 0)(batch_of(family, data_dir)).sum().backward()
        dead = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not dead, dead
        return train_blip.count_trainable(peft_model)
    finally:
        peft_model.unload()


def train(model_dir: Path, data_dir: Path, out: Path, epochs: int = 2):
    return train_blip.main(
        [
            f"--MODEL_ID={model_dir}",
            f"--DATA_DIR={data_dir}",
            f"--OUTPUT_DIR={out}",
            f"--EPOCHS={epochs}",
            "--LR=1e-2",
            *TRAIN,
        ]
    )


def check_trained_run(out: Path, results: dict, family_name: str, prompt: str):
    assert results["epochs"] == 2 and results["trainable_params"] > 0
    assert results["prefix_cache"] == "off" and family_name in results["prefix_cache_note"]
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["PROMPT"] == prompt and saved["FAMILY"] == family_name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "captions" in rows[-1]
    assert (out / "adapter_model.safetensors").is_file()
    # the saved tokenizer does not carry the caption truncation (it would cut the next prompt short)
    assert json.loads((out / "tokenizer.json").read_text()).get("truncation") is None


def check_resume_gives_the_same_adapter(straight: Path, model_dir: Path, data_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    train(model_dir, data_dir, tmp_path, epochs=1)
    resumed = train(model_dir, data_dir, tmp_path, epochs=2)
    assert resumed["resumed_from"]
    a, b = (
        load_file(straight / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_captions_compare_merge_round_trip(out: Path, model_dir: Path, data_dir: Path, tmp_path: Path):
    """inference.main with COMPARE_BASE and MERGE_TO; a fresh base + the saved adapter gives the same
    captions, batched equals one by one, and the merged model captions the same."""
    from peft import PeftModel

    images = sorted(data_dir.glob("*.jpg"))[:4]
    result = inference.main(
        [
            f"--ADAPTER_DIR={out}",
            f"--IMAGES={data_dir}",
            *CAPTION,
            "--BATCH_SIZE=4",
            "--COMPARE_BASE=True",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
            f"--MERGE_TO={tmp_path / 'merged'}",
            "--REFERENCES=None",
        ]
    )
    tuned = {r["file"]: r["fine_tuned"] for r in result["images"]}
    assert all("base" in r for r in result["images"])
    assert any(r["base"] != r["fine_tuned"] for r in result["images"])  # the adapter changed something
    settings = dict(max_new_tokens=11, min_new_tokens=1, num_beams=1)

    family = families.load(
        str(model_dir), prompt=json.loads((out / "training_config.json").read_text())["PROMPT"]
    )
    fresh = PeftModel.from_pretrained(family.load_model(str(model_dir)), out).eval()
    pics = [inference.common.open_image(p) for p in images]
    batched = inference.caption_images(fresh, family, pics, batch_size=4, **settings)
    assert batched == [
        inference.caption_images(fresh, family, [p], batch_size=1, **settings)[0] for p in pics
    ]
    assert batched == [tuned[p.name] for p in images]
    merged_family = families.load(str(tmp_path / "merged"))
    merged = merged_family.load_model(str(tmp_path / "merged")).eval()
    assert inference.caption_images(merged, merged_family, pics, **settings) == batched
    return result
