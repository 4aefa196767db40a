"""The model-family seam (families.py): choosing an entry, refusing what is not supported, the
plain path that a family without speed hooks takes, and each supported family end to end.

Every model here is a tiny random one built from its family's config, with a processor made
offline (conftest's build_tiny_blip / build_tiny_git); nothing comes from the Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import families
import inference
import train_blip
from common import UserError
from conftest import REPO, make_good_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("family_data")
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=8)))
    return folder


def batch_of(family, data_dir: Path, n: int = 4) -> dict:
    """A real batch through the family's own tokenizer, image processor and collate."""
    from PIL import Image

    captions = json.loads((data_dir / "captions.json").read_text())
    names = sorted(captions)[:n]
    ids = family.tokenize([captions[x] + " and more words" * (i % 2) for i, x in enumerate(names)], 16)
    pixels = family.pixel_values([Image.open(data_dir / x).convert("RGB") for x in names])
    return family.collate(
        [{"index": i, "input_ids": t, "pixel_values": p} for i, (t, p) in enumerate(zip(ids, pixels))]
    )


# ----------------------------------------------------------------------------- choosing the entry
def test_the_entry_comes_from_the_config(tiny_blip_dir, tiny_git_dir):
    assert type(families.load(str(tiny_blip_dir))) is families.Blip
    assert type(families.load(str(tiny_git_dir))) is families.Git


def test_an_unsupported_model_is_one_line_listing_the_supported(tmp_path, data_dir):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(
        UserError,
        match=r"model type 'bert' is not supported.*Supported model types: blip, git, blip-2, llava",
    ):
        train_blip.main(
            [f"--MODEL_ID={tmp_path / 'bert'}", f"--DATA_DIR={data_dir}", f"--OUTPUT_DIR={tmp_path / 'out'}"]
        )
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # As a user sees it: one line, exit 2, and no weights were ever loaded or re-initialised.
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_blip.py"),
            f"--MODEL_ID={tmp_path / 'bert'}",
            f"--DATA_DIR={data_dir}",
            f"--OUTPUT_DIR={tmp_path / 'out2'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: model type 'bert' is not supported")
    assert "newly initialized" not in run.stderr + run.stdout


def test_ofa_says_why_and_names_the_alternatives(tmp_path):
    (tmp_path / "ofa").mkdir()
    (tmp_path / "ofa" / "config.json").write_text(json.dumps({"model_type": "ofa", "vocab_size": 10}))
    with pytest.raises(
        UserError, match=r"OFA is not in transformers.*Supported model types: blip, git, blip-2, llava"
    ):
        families.load(str(tmp_path / "ofa"))


# ----------------------------------------------------------------------------- the plain path
class PlainBlip(families.Blip):
    """BLIP without its speed hooks: the generic forward and generate() that any family gets."""

    vision_stages = families.Family.vision_stages
    caption_logits = families.Family.caption_logits
    enable_sdpa = families.Family.enable_sdpa


def test_the_plain_path_equals_the_hooked_one(tiny_blip_dir, data_dir):
    """A family without hooks trains and captions the same: loss and gradients (no prefix cache,
    full forward) and captions with the base compared (two full generate() calls)."""
    from peft import LoraConfig, get_peft_model

    hooked = families.load(str(tiny_blip_dir))
    plain = PlainBlip(hooked.config, hooked.processor)
    torch.manual_seed(0)
    model = get_peft_model(
        hooked.load_model(str(tiny_blip_dir)),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(families.Blip.lora_targets)),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = batch_of(hooked, data_dir)
    results = []
    for family in (hooked, plain):
        model.zero_grad()
        loss = train_blip.CaptionModel(model, family, 0)(batch)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    model.eval()
    pixels = batch["pixel_values"]
    settings = dict(num_beams=2, max_new_tokens=8)
    tuned, base = inference.generate_ids(model, hooked, pixels, compare_base=True, **settings)
    plain_tuned, plain_base = inference.generate_ids(model, plain, pixels, compare_base=True, **settings)
    assert torch.equal(plain_tuned[:, -tuned.shape[1] :], tuned) and torch.equal(
        plain_base[:, -base.shape[1] :], base
    )
    assert hooked.decode(tuned) == plain.decode(plain_tuned)


# ----------------------------------------------------------------------------- GIT
@pytest.fixture(scope="module")
def git(tiny_git_dir):
    family = families.load(str(tiny_git_dir))
    return family, family.load_model(str(tiny_git_dir))


def test_git_loss_is_the_hand_computed_caption_cross_entropy(git, data_dir):
    """GIT's logits start with the image positions; the loss covers exactly the caption tokens after
    [CLS] (and [SEP]), never the image, the prompt or a pad, averaged per caption."""
    family, model = git
    batch = batch_of(family, data_dir)
    assert (batch["input_ids"][:, 0] == family.processor.tokenizer.cls_token_id).all()
    losses = train_blip.CaptionModel(model, family, 0)(batch)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    n_image = logits.shape[1] - batch["input_ids"].shape[1]
    assert n_image == 5  # 2 x 2 patches + CLS of the tiny 32 px, patch-16 vision tower
    for row in range(len(losses)):
        length = int(batch["attention_mask"][row].sum())
        caption = batch["input_ids"][row, 1:length]  # what is learnt: every token after [CLS]
        predicted = logits[row, n_image : n_image + length - 1]  # position t predicts token t + 1
        hand = -F.log_softmax(predicted, -1).gather(1, caption[:, None]).mean()
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 1  # padding was really there


def test_git_default_lora_targets_the_decoder_and_every_adapter_gets_a_gradient(git, data_dir):
    family, model = git
    cfg = dict(train_blip.common.defaults_of(vars(train_blip)), LORA_DROPOUT=0.0)
    peft_model = train_blip.apply_lora(model, family, cfg, "git", log=lambda *_: None)
    try:
        names = train_blip.trainable_names(peft_model)
        assert names and all(".encoder.layer." in n and "image_encoder" not in n for n in names), sorted(
            names
        )[:4]
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # B starts at zero, which would leave every A without gradient
        train_blip.CaptionModel(peft_model, family, 0)(batch_of(family, data_dir)).sum().backward()
        dead = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not dead, dead
    finally:
        peft_model.unload()  # the module-scoped model is shared with the other tests


@pytest.fixture(scope="module")
def git_run(tiny_git_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("git_run") / "out"
    results = train_blip.main(
        [
            f"--MODEL_ID={tiny_git_dir}",
            f"--DATA_DIR={data_dir}",
            f"--OUTPUT_DIR={out}",
            "--EPOCHS=2",
            "--LR=1e-2",
            *TRAIN,
        ]
    )
    return out, results


def test_git_trains_with_the_plain_path_and_says_why_there_is_no_cache(git_run):
    out, results = git_run
    assert (
        results["prefix_cache"] == "off"
        and "no vision-stage hook for the git family" in results["prefix_cache_note"]
    )
    assert results["epochs"] == 2 and results["trainable_params"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["captions"][0]["generated"]  # sample captions work through the family too
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()


def test_git_resume_gives_the_same_adapter(git_run, tiny_git_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    straight, _ = git_run
    args = [
        f"--MODEL_ID={tiny_git_dir}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={tmp_path}",
        "--LR=1e-2",
        *TRAIN,
    ]
    train_blip.main([*args, "--EPOCHS=1"])
    resumed = train_blip.main([*args, "--EPOCHS=2"])
    assert resumed["resumed_from"]
    a, b = (
        load_file(straight / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_git_captions_compares_merges_and_round_trips(git_run, tiny_git_dir, data_dir, tmp_path):
    from peft import PeftModel

    out, _ = git_run
    images = sorted(data_dir.glob("*.jpg"))[:4]
    result = inference.main(
        [
            f"--ADAPTER_DIR={out}",
            f"--IMAGES={data_dir}",
            *CAPTION,
            "--BATCH_SIZE=4",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
            f"--MERGE_TO={tmp_path / 'merged'}",
            "--REFERENCES=None",
        ]
    )
    tuned = {r["file"]: r["fine_tuned"] for r in result["images"]}
    assert all("base" in r for r in result["images"]) and result["figure"]["panels"] == len(result["images"])
    assert any(r["base"] != r["fine_tuned"] for r in result["images"])  # the adapter changed something
    settings = dict(max_new_tokens=11, min_new_tokens=1, num_beams=1)

    # Batched equals one by one; a fresh base + the saved adapter gives the same captions.
    family = families.load(str(tiny_git_dir))
    fresh = PeftModel.from_pretrained(family.load_model(str(tiny_git_dir)), out).eval()
    pics = [inference.common.open_image(p) for p in images]
    batched = inference.caption_images(fresh, family, pics, batch_size=4, **settings)
    assert batched == [
        inference.caption_images(fresh, family, [p], batch_size=1, **settings)[0] for p in pics
    ]
    assert batched == [tuned[p.name] for p in images]
    # The merged export is a plain GIT model with the same captions.
    merged_family = families.load(str(tmp_path / "merged"))
    merged = merged_family.load_model(str(tmp_path / "merged")).eval()
    assert inference.caption_images(merged, merged_family, pics, **settings) == batched


def test_runs_print_no_upstream_deprecation_noise(git_run, data_dir, tmp_path):
    """peft's own use of transformers' deprecated is_gradient_checkpointing is filtered, narrowly."""
    out, _ = git_run
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "inference.py"),
            f"--ADAPTER_DIR={out}",
            f"--IMAGES={sorted(data_dir.glob('*.jpg'))[0]}",
            *CAPTION,
            "--REFERENCES=None",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "is_gradient_checkpointing" not in run.stderr
