"""Tests for train_blip.py on a tiny random BLIP (conftest's build_tiny_blip) and the real processor.

Covered: train-as-you-generate collation, LoRA targets and the 344,064 count, data order and
sharding, the frozen-prefix cache (exact), bf16 autocast, outputs and both ways of loading them,
resume and Ctrl-C equality, full fine-tune and FREEZE_VISION, bad input, and two learning checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipConfig

import common
import families
import train_blip
from common import UserError
from conftest import train_in_process
from download_coco import add_mistakes

REPO = Path(__file__).resolve().parents[1]
SUFFIX = ["thwisss", "iz", "funny."]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def mirror_captions(coco_mirror: Path) -> list[tuple[str, str]]:
    """(file_name, first caption) of every val2017 image in the mirror, sorted."""
    with zipfile.ZipFile(coco_mirror / "annotations" / "annotations_trainval2017.zip") as z:
        ann = json.loads(z.read("annotations/captions_val2017.json"))
    first = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    return sorted((im["file_name"], first[im["id"]]) for im in ann["images"] if im["id"] in first)


def write_dataset(folder: Path, items, source: Path) -> Path:
    """Copy images from `source` and write captions.json with the mistake captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in items:
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "captions.json").write_text(json.dumps({n: add_mistakes(c) for n, c in items}))
    return folder


@pytest.fixture(scope="module")
def mirror_data(tmp_path_factory, coco_mirror) -> Path:
    """24 mirror images with the tutorial's mistake captions (22 train / 2 validation)."""
    return write_dataset(
        tmp_path_factory.mktemp("data"), mirror_captions(coco_mirror)[:24], coco_mirror / "val2017"
    )


def args(model_dir, data_dir, out_dir, *extra) -> list[str]:
    return [
        f"--MODEL_ID={model_dir}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={out_dir}",
        "--PRECISION=fp32",
        "--NUM_WORKERS=0",
        "--LOG_EVERY=2",
        "--NUM_SAMPLE_CAPTIONS=1",
        "--MAX_CAPTION_TOKENS=24",
        *extra,
    ]


def load_adapter(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out_dir / "adapter_model.safetensors")


def logged_losses(out_dir: Path) -> list:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["type"], m["step"], m.get("loss"), m.get("train_loss"), m.get("val_loss")) for m in lines]


def tiny_core(model_dir, lora=True, freeze_vision=False, targets=None):
    """A CaptionModel around the tiny BLIP (LoRA as the script applies it) and its prefix length."""
    cfg = dict(common.defaults_of(vars(train_blip)), FREEZE_VISION=freeze_vision)
    if targets:
        cfg["LORA_TARGET_MODULES"] = targets
    torch.manual_seed(0)
    family = families.load(str(model_dir))
    model = family.load_model(str(model_dir))
    if freeze_vision:
        model.vision_model.requires_grad_(False)
    if lora:
        model = train_blip.apply_lora(model, family, cfg, str(model_dir), log=lambda *_: None)
        with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the comparison
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    blip = families.base_model(model)
    k, _ = train_blip.frozen_prefix_length(family.vision_stages(blip))
    return train_blip.CaptionModel(model, family, k), blip, k


def real_batch(model_dir, data_dir, n=4):
    family = families.load(str(model_dir))
    caps = json.loads((Path(data_dir) / "captions.json").read_text())
    names = sorted(caps)[:n]
    ids = family.tokenize([caps[x] for x in names], 24)
    ds = train_blip.CaptionImages([Path(data_dir) / x for x in names], ids, family)
    return family.collate([ds[i] for i in range(n)])


# ----------------------------------------------------------------------------- collation and tokens
def test_collate_puts_dec_token_first_and_masks_pads(tiny_blip_dir):
    family = families.load(str(tiny_blip_dir))
    processor = family.processor
    captions = [
        "A dog.",
        "A pizza with burned edges iz sitting on thwisss table. thwisss iz funny.",
        "Two cats",
    ]
    ids = family.tokenize(captions, 64)
    batch = family.collate(
        [{"index": i, "input_ids": x, "pixel_values": torch.zeros(3, 8, 8)} for i, x in enumerate(ids)]
    )
    lengths = [len(x) for x in ids]
    assert batch["input_ids"].shape == (3, max(lengths))  # padded to this batch's longest, not a fixed size
    assert (batch["input_ids"][:, 0] == 30522).all()  # [DEC], as generate() starts, not [CLS]
    assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()  # exactly the pads
    for row, n in enumerate(lengths):
        assert batch["input_ids"][row, n - 1] == processor.tokenizer.sep_token_id  # [SEP] kept: learn to stop
        assert torch.equal(batch["labels"][row, :n], batch["input_ids"][row, :n])
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_rows"].tolist() == [0, 1, 2]


def test_main_trains_on_batches_that_start_with_dec_and_mask_only_pads(
    tiny_blip_dir, mirror_data, tmp_path, monkeypatch
):
    """The batches main()'s own DataLoader yields (not a hand-built one): [DEC] first, then the caption's
    tokens as the tokenizer gives them, and labels that are -100 exactly on the pads."""
    seen = []
    real_collate = families.Blip.collate

    def recording(self, examples):
        batch = real_collate(self, examples)
        seen.append(batch)
        return batch

    monkeypatch.setattr(families.Blip, "collate", recording)
    train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--MAX_STEPS=2", "--NUM_SAMPLE_CAPTIONS=0"))
    assert len(seen) == 2 + 1  # two training batches (of 4) and the validation batch (of 2)
    processor = families.load(str(tiny_blip_dir)).processor
    bos = BlipConfig.from_pretrained(tiny_blip_dir).text_config.bos_token_id
    assert bos == 30522  # [DEC], which generate() starts from; the tokenizer itself puts [CLS] (101) first
    caps = json.loads((mirror_data / "captions.json").read_text())
    by_index = [caps[n] for n in sorted(caps)]  # the dataset's items are sorted by file name
    for batch in seen:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert (ids[:, 0] == bos).all(), ids[:, 0]
        assert ((labels == -100) == (mask == 0)).all()
        assert torch.equal(labels[mask == 1], ids[mask == 1])
        for row, index in enumerate(batch["index"].tolist()):
            expected = processor.tokenizer(by_index[index], truncation=True, max_length=24).input_ids
            assert expected[0] == processor.tokenizer.cls_token_id
            assert ids[row, 1 : len(expected)].tolist() == expected[1:]
            assert mask[row].sum() == len(expected)


def test_long_caption_is_truncated_and_keeps_sep(tiny_blip_dir):
    family = families.load(str(tiny_blip_dir))
    tok = family.processor.tokenizer
    (ids,) = family.tokenize(["word " * 5000], 16)
    assert len(ids) == 16 and ids[-1] == tok.sep_token_id


# ----------------------------------------------------------------------------- LoRA
def test_default_lora_on_full_size_blip_has_344064_trainable_params(tmp_path):
    from transformers import BlipConfig, BlipForConditionalGeneration

    model = BlipForConditionalGeneration(BlipConfig())  # the real BLIP-base architecture, random weights
    cfg = common.defaults_of(vars(train_blip))
    family = families.Blip(model.config, None)
    model = train_blip.apply_lora(model, family, cfg, "Salesforce/blip-image-captioning-base")
    assert train_blip.count_trainable(model) == 344_064
    model.save_pretrained(tmp_path)
    size_mb = (tmp_path / "adapter_model.safetensors").stat().st_size / 1e6
    assert 1.35 < size_mb < 1.42, size_mb  # about 1.38 MB
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Salesforce/blip-image-captioning-base"
    stages = family.vision_stages(model.get_base_model())
    assert train_blip.frozen_prefix_length(stages)[0] == 7  # embeddings + layers 0-5


def test_unknown_lora_target_names_the_nearest_modules(tiny_blip_dir):
    family = families.load(str(tiny_blip_dir))
    model = family.load_model(str(tiny_blip_dir))
    with pytest.raises(
        UserError, match=r"'vision_model.encoder.layers.6.self_attn.qkvv'.*nearest.*layers.6.self_attn.qkv"
    ):
        train_blip.resolve_targets(model, family, ["vision_model.encoder.layers.6.self_attn.qkvv"], False)


def test_freeze_vision_drops_vision_targets_and_caches_the_whole_vision_output(tiny_blip_dir, capsys):
    cfg = dict(common.defaults_of(vars(train_blip)), FREEZE_VISION=True)
    family = families.load(str(tiny_blip_dir))
    model = family.load_model(str(tiny_blip_dir))
    model.vision_model.requires_grad_(False)
    model = train_blip.apply_lora(model, family, cfg, str(tiny_blip_dir))
    assert "dropped vision LoRA targets" in capsys.readouterr().out
    names = train_blip.trainable_names(model)
    assert names and not any("vision_model" in n for n in names)
    stages = family.vision_stages(model.get_base_model())
    assert train_blip.frozen_prefix_length(stages)[0] == len(stages)


# ----------------------------------------------------------------------------- data order and sharding
def test_columns_give_each_item_once_per_epoch_and_fixed_shards():
    cols = train_blip.deal_columns(22, 4, 1, seed=0)
    for epoch in range(3):
        steps = train_blip.epoch_steps(cols, epoch, 0, 0, batch_size=4, grad_accum=1)
        seen = [i for _, mbs in steps for mb in mbs for i in mb]
        assert sorted(seen) == list(range(22)) and len(steps) == 6 and steps[-1][0] == 2
    e0 = train_blip.epoch_steps(cols, 0, 0, 0, 4, 1)
    assert e0 != train_blip.epoch_steps(cols, 1, 0, 0, 4, 1)  # reshuffled every epoch

    def step_sets(batch_size, grad_accum, world):
        c = train_blip.deal_columns(24, 4, world, seed=0)
        per_rank = [train_blip.epoch_steps(c, 1, 0, r, batch_size, grad_accum) for r in range(world)]
        return [sorted(i for r in range(world) for mb in per_rank[r][k][1] for i in mb) for k in range(6)]

    # One process x batch 4 = batch 1 x 4 accumulation = two processes x batch 2: the same steps.
    assert step_sets(4, 1, 1) == step_sets(1, 4, 1) == step_sets(2, 1, 2)
    # Two processes: disjoint shards that stay the same every epoch (so each prefix cache stays small).
    c2 = train_blip.deal_columns(24, 4, 2, seed=0)
    shards = [
        {
            i
            for e in range(3)
            for _, mbs in train_blip.epoch_steps(c2, e, 0, r, 2, 1)
            for mb in mbs
            for i in mb
        }
        for r in (0, 1)
    ]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 12
    # An uneven count wraps around so that both processes take the same number of full steps.
    c3 = train_blip.deal_columns(22, 4, 2, seed=0)
    assert all(len(c) == 6 for c in c3)


def test_split_is_seeded_and_keeps_a_validation_image():
    assert train_blip.split_train_val(10, 0.1, 1) == train_blip.split_train_val(10, 0.1, 1)
    train, val = train_blip.split_train_val(10, 0.1, 1)
    assert len(val) == 1 and sorted(train + val) == list(range(10))
    assert train_blip.split_train_val(1, 0.1, 1) == ([0], [])


# ----------------------------------------------------------------------------- the prefix cache and precision
@pytest.mark.parametrize(
    "freeze_vision,lora,mode", [(False, True, "ram"), (True, True, "disk"), (False, False, "ram")]
)
def test_prefix_cache_gives_identical_loss_and_gradients(
    seeing_tiny_blip_dir, mirror_data, tmp_path, freeze_vision, lora, mode
):
    """Cached and uncached forwards are the same computation in fp32: equal to the last bit.
    (LoRA from layer 6; the whole vision tower frozen; and a full fine-tune, where only pixels are cached.)
    On a model whose loss depends on the image, so a cache that loses the image shows in the loss."""
    core, blip, k = tiny_core(seeing_tiny_blip_dir, lora=lora, freeze_vision=freeze_vision)
    assert k == {(False, True): 7, (True, True): 12, (False, False): 0}[(freeze_vision, lora)]
    batch = real_batch(seeing_tiny_blip_dir, mirror_data)
    with torch.no_grad():  # first, the premise: another image gives another loss
        shuffled = dict(batch, pixel_values=batch["pixel_values"].roll(1, 0))
        core.eval()
        assert (core(batch) - core(shuffled)).abs().min() > 1e-4
        core.train()
    shape = core.family.prefix_shape(blip, k)
    cache = train_blip.PrefixCache(range(4), shape, torch.float32, mode, tmp_path / "cache.bin")
    results = []
    for use_cache in (False, True, True):  # off; on (filling); on (reading back)
        core.prefix_stages = k if use_cache else 0
        core.zero_grad()
        torch.manual_seed(1)  # the same LoRA dropout masks
        vision = train_blip.vision_inputs(core, batch, cache if use_cache else None, contextlib.nullcontext)
        losses = core(batch, **vision)
        losses.sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in core.parameters() if p.requires_grad]))
    cache.close()
    for losses, grads in results[1:]:
        assert torch.equal(losses, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1], strict=True))


def test_prefix_cache_plan_spills_or_turns_off_with_one_line(tmp_path):
    mode, line = train_blip.PrefixCache.plan(100, 1 << 20, 1024, "auto", tmp_path)
    assert mode == "ram" and "100 MB in RAM" in line
    mode, line = train_blip.PrefixCache.plan(100, 1 << 20, 10, "auto", tmp_path)
    assert mode == "disk" and "above PREFIX_CACHE_MAX_MB=10" in line
    mode, line = train_blip.PrefixCache.plan(10**9, 1 << 20, 10, "auto", tmp_path)
    assert mode == "off" and "disk is free" in line


def test_bf16_autocasts_on_cpu_and_stays_within_2_percent_of_fp32(tiny_blip_dir, mirror_data):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    core, blip, _ = tiny_core(tiny_blip_dir)
    batch = real_batch(tiny_blip_dir, mirror_data)
    with torch.no_grad():
        fp32 = core(batch)
    AcceleratorState._reset_state(reset_partial_state=False)
    wrapped = Accelerator(mixed_precision="bf16").prepare(core)
    with torch.no_grad():
        rounded_per_use = wrapped(batch)
    seen = []
    blip.text_decoder.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, i, out: seen.append(out.dtype)
    )
    train_blip.cast_frozen_linears(blip, torch.bfloat16)
    with torch.no_grad():
        bf16 = wrapped(batch)
    AcceleratorState._reset_state(reset_partial_state=False)
    assert seen == [torch.bfloat16]  # accelerate really autocasts on CPU
    assert ((bf16 - fp32).abs() / fp32).max() < 0.02
    # Casting the frozen weights ahead is what autocast did on each use (kernels may sum in another order).
    torch.testing.assert_close(bf16, rounded_per_use, rtol=1e-4, atol=0)
    # The LM head, tied to the word embeddings, gets a bf16 copy; the embedding table stays fp32.
    head = blip.text_decoder.cls.predictions.decoder
    table = blip.text_decoder.bert.embeddings.word_embeddings
    assert head.weight.dtype == torch.bfloat16 and table.weight.dtype == torch.float32
    assert torch.equal(head.weight, table.weight.bfloat16())


def test_caption_loss_is_cross_entropy_per_caption():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    targets[0, :2] = targets[2, :] = -100  # not learnt; a caption with nothing to learn counts 0
    for smoothing in (0.0, 0.1):
        losses = train_blip.caption_loss(logits, targets, smoothing)
        for row in range(3):
            kept = targets[row] != -100
            expected = (
                F.cross_entropy(logits[row][kept].float(), targets[row][kept], label_smoothing=smoothing)
                if kept.any()
                else torch.tensor(0.0)
            )
            torch.testing.assert_close(losses[row], expected)
        (grad,) = torch.autograd.grad(losses.sum(), logits)
        assert grad[2].abs().sum() == 0 and grad[0, :2].abs().sum() == 0 and grad[1].abs().sum() > 0


def test_sample_captions_after_the_first_and_last_epoch_and_every_n(train_args, tmp_path):
    out = tmp_path / "out"
    run_args = [*train_args, f"--OUTPUT_DIR={out}", "--SAVE_EVERY_STEPS=0"]
    train_in_process([*run_args, "--EPOCHS=6", "--NUM_SAMPLE_CAPTIONS=1", "--SAMPLE_EVERY_EPOCHS=4"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs if "captions" in r] == [1, 4, 6]
    assert all(r["captions"][0]["generated"] for r in epochs if "captions" in r)


# ----------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def straight_run(tiny_blip_dir, mirror_data, tmp_path_factory):
    """Two epochs in fp32, uninterrupted, with the default LoRA and the prefix cache on."""
    out = tmp_path_factory.mktemp("straight")
    results = train_blip.main(args(tiny_blip_dir, mirror_data, out, "--EPOCHS=2", "--NUM_WORKERS=1"))
    return out, results


def test_outputs_follow_the_contract_and_load_both_ways(straight_run, tiny_blip_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration

    out, results = straight_run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "training_config.json",
        "metrics.jsonl",
        "loss_curve.png",
        "train_results.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_blip_dir).resolve())
    saved = json.loads((out / "train_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    epochs = [
        m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["type"] == "epoch"
    ]
    adapter = load_adapter(out)
    assert saved["trainable_params"] == sum(t.numel() for t in adapter.values()) == 28_672
    assert saved["epochs"] == len(epochs) == 2 and saved["optimizer_steps"] == 12
    assert (
        saved["final_train_loss"] == epochs[-1]["train_loss"]
        and saved["final_val_loss"] == epochs[-1]["val_loss"]
    )
    assert 0 < saved["final_train_loss"] < 20 and 0 < saved["final_val_loss"] < 20
    assert len(saved["epoch_samples_per_s"]) == 2 and all(r > 0 for r in saved["epoch_samples_per_s"])
    assert (
        saved["train_samples_per_s"] == saved["epoch_samples_per_s"][1]
    )  # the steady epochs: all but the first
    assert saved["peak_rss_mb"] > 100
    assert saved["prefix_cache"] == "ram" and saved["precision"] == "fp32"
    assert (saved["n_train"], saved["n_val"], saved["world_size"], saved["effective_batch"]) == (22, 2, 1, 4)
    assert json.loads((out / "training_config.json").read_text())["EPOCHS"] == 2
    # Checkpoints are kept (one per epoch, KEEP_CHECKPOINTS=2) and whole.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000006", "step-00000012"]
    assert saved["last_checkpoint"] == str(checkpoints[-1])
    for c in checkpoints:
        for name in (
            "model.safetensors",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "trainer_state.json",
        ):
            assert (c / name).is_file(), c / name
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["global_step"] == 12
    assert epochs[-1]["captions"][0]["target"].endswith("thwisss iz funny.")

    # Both ways of loading give the saved weights (the trained ones: LoRA B starts at zero).
    assert len(adapter) == 20 and any((t != 0).any() for k, t in adapter.items() if "lora_B" in k)
    peft_model = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_blip_dir), out)
    loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded.keys() == adapter.keys()
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    last = load_file(checkpoints[-1] / "model.safetensors")  # the checkpoint holds the same trainable weights
    assert all(
        torch.equal(last["model." + k.replace(".weight", ".default.weight")], adapter[k]) for k in adapter
    )
    native = BlipForConditionalGeneration.from_pretrained(out)  # transformers' adapter integration
    assert getattr(native, "_hf_peft_config_loaded", False)
    native_lora = {n: p for n, p in native.named_parameters() if "lora_" in n}
    assert len(native_lora) == 20
    for k, t in adapter.items():  # base_model.model.X.lora_A.weight -> X.lora_A.default.weight
        assert torch.equal(
            native_lora[k.removeprefix("base_model.model.").replace(".weight", ".default.weight")], t
        ), k
    # The merged weights, what an export gets: the base plus (alpha / r) * B @ A of the saved adapter.
    merged = peft_model.merge_and_unload().state_dict()
    base = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir).state_dict()
    qkv = "vision_model.encoder.layers.9.self_attn.qkv"
    a, b = adapter[f"base_model.model.{qkv}.lora_A.weight"], adapter[f"base_model.model.{qkv}.lora_B.weight"]
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    assert not torch.equal(merged[qkv + ".weight"], base[qkv + ".weight"])
    assert torch.allclose(merged[qkv + ".weight"], base[qkv + ".weight"] + scale * b @ a, atol=1e-6)


def test_resume_gives_identical_adapter_and_logged_losses(
    straight_run, tiny_blip_dir, mirror_data, tmp_path, count_optimizer_steps
):
    from safetensors.torch import load_file, save_file

    straight, _ = straight_run
    first = train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--EPOCHS=1", "--NUM_WORKERS=1"))
    assert first["epochs"] == 1
    control = tmp_path.parent / f"{tmp_path.name}-control"  # the same checkpoint, one weight altered
    shutil.copytree(tmp_path, control)
    count_optimizer_steps.clear()
    resumed = train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--EPOCHS=2", "--NUM_WORKERS=1"))
    assert resumed["resumed_from"].endswith("step-00000006")
    assert len(count_optimizer_steps) == 12 - 6  # continued: a restart from scratch would also match, in 12
    a, b = load_adapter(straight), load_adapter(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(straight) == logged_losses(tmp_path)

    # The control: resuming from an altered checkpoint must end differently, or nothing was loaded.
    weights_path = control / "checkpoints" / "step-00000006" / "model.safetensors"
    weights = load_file(weights_path)
    weights[sorted(k for k in weights if "lora_B" in k)[0]] += 1e-3
    save_file(weights, weights_path, metadata={"format": "pt"})
    train_blip.main(args(tiny_blip_dir, mirror_data, control, "--EPOCHS=2", "--NUM_WORKERS=0"))
    c = load_adapter(control)
    assert not all(torch.equal(a[k], c[k]) for k in a), (
        "the altered checkpoint changed nothing: it was not loaded"
    )


def test_ctrl_c_saves_a_checkpoint_mid_epoch_and_resume_matches(
    straight_run, tiny_blip_dir, mirror_data, tmp_path, monkeypatch, capsys, count_optimizer_steps
):
    straight, _ = straight_run
    real_write = train_blip.write_metrics

    def write_then_interrupt(history, out_dir):  # a real SIGINT, as Ctrl-C sends, after step 8
        real_write(history, out_dir)
        if history[-1]["type"] == "train" and history[-1]["step"] == 8:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_blip, "write_metrics", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--EPOCHS=2", "--NUM_WORKERS=1"))
    out = capsys.readouterr().out
    assert "checkpoint: " + str(tmp_path / "checkpoints" / "step-00000008") in out
    assert "resume with: python train_blip.py" in out
    monkeypatch.setattr(train_blip, "write_metrics", real_write)
    count_optimizer_steps.clear()
    resumed = train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--EPOCHS=2"))
    assert resumed["resumed_from"].endswith("step-00000008")
    assert len(count_optimizer_steps) == 12 - 8
    a, b = load_adapter(straight), load_adapter(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(straight) == logged_losses(tmp_path)


def test_batch_size_and_accumulation_compute_the_same_step(tiny_blip_dir, mirror_data, tmp_path):
    """Per-caption mean loss: batch 4 = batch 1 x 4 accumulation = batch 2 x 2 (the tutorial's math)."""
    adapters = []
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        out = tmp_path / f"bs{bs}"
        train_blip.main(
            args(
                tiny_blip_dir,
                mirror_data,
                out,
                "--MAX_STEPS=2",
                f"--BATCH_SIZE={bs}",
                f"--GRAD_ACCUM={ga}",
                "--LORA_DROPOUT=0.0",
                "--NUM_SAMPLE_CAPTIONS=0",
                "--LR=1e-3",
            )
        )
        adapters.append(load_adapter(out))
    for other in adapters[1:]:
        assert all(torch.allclose(adapters[0][k], other[k], atol=1e-6) for k in other)
    assert any((v != 0).any() for k, v in adapters[0].items() if "lora_B" in k)  # it did train


def test_full_fine_tune_saves_a_whole_model(tiny_blip_dir, mirror_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration

    results = train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path, "--USE_LORA=False", "--MAX_STEPS=1"))
    assert results["trainable_params"] == results["total_params"]
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    assert "preprocessed images" in results["prefix_cache_note"]
    loaded = BlipForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    base = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir).state_dict()
    trained = load_file(
        tmp_path / "checkpoints" / "step-00000001" / "model.safetensors"
    )  # every weight: all train
    assert all(torch.equal(loaded[k.removeprefix("model.")], v) for k, v in trained.items())
    changed = [k for k in base if not torch.equal(loaded[k], base[k])]
    assert len(changed) > 100, changed  # one step of AdamW moves (nearly) every weight


def test_augment_and_disk_bound_switch_the_cache(tiny_blip_dir, mirror_data, tmp_path):
    r = train_blip.main(args(tiny_blip_dir, mirror_data, tmp_path / "a", "--AUGMENT=True", "--MAX_STEPS=1"))
    assert r["prefix_cache"] == "off" and "AUGMENT" in r["prefix_cache_note"]
    r = train_blip.main(
        args(tiny_blip_dir, mirror_data, tmp_path / "d", "--PREFIX_CACHE_MAX_MB=0", "--MAX_STEPS=1")
    )
    assert r["prefix_cache"] == "disk" and not list((tmp_path / "d").glob(".prefix_cache*"))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "content,message",
    [
        (None, "captions.json not found"),
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'["a.jpg"]', "expected a mapping"),
        (b'{"a.jpg": 3}', "caption of 'a.jpg' is a int"),
    ],
)
def test_bad_captions_json_is_one_clear_error(tmp_path, content, message):
    data = tmp_path / "data"
    data.mkdir()
    if content is not None:
        (data / "captions.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        train_blip.main([f"--DATA_DIR={data}", f"--OUTPUT_DIR={tmp_path / 'out'}"])


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="OUTPUT_DIR"):
        train_blip.main([f"--OUTPUT_DIR={blocker / 'out'}", f"--DATA_DIR={tmp_path}"])


def test_bad_images_are_skipped_with_one_warning(tiny_blip_dir, mirror_data, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    caps = json.loads((mirror_data / "captions.json").read_text())
    for name in list(caps)[:6]:
        (data / name).write_bytes((mirror_data / name).read_bytes())
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.jpg").write_text("hello")
    (data / "cut.jpg").write_bytes((mirror_data / name).read_bytes()[:2000])
    caps = {n: caps[n] for n in list(caps)[:6]} | {
        "empty.jpg": "x",
        "text.jpg": "x",
        "cut.jpg": "x",
        "gone.jpg": "x",
        list(caps)[0].replace(".jpg", ".png"): "x",
    }
    (data / "captions.json").write_text(json.dumps(caps))
    results = train_blip.main(args(tiny_blip_dir, data, tmp_path / "out", "--MAX_STEPS=1"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "skipped 5 of 11" in warnings[0]
    for name in ("empty.jpg", "text.jpg", "cut.jpg", "gone.jpg (missing file)"):
        assert name in warnings[0]
    assert results["n_train"] + results["n_val"] == 6


def test_empty_dataset_is_a_clear_error_in_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.json").write_text(json.dumps({"gone.jpg": "a caption"}))
    with pytest.raises(UserError, match="no usable images"):
        train_blip.main([f"--DATA_DIR={data}", f"--OUTPUT_DIR={tmp_path / 'out'}"])
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_blip.py"),
            f"--DATA_DIR={tmp_path / 'nothing'}",
            f"--OUTPUT_DIR={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing' / 'captions.json'} not found: "
        "run `python download_coco.py` first, or set DATA_DIR"
    ]


# ----------------------------------------------------------------------------- learning, shown honestly
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 30),
    "purple": (130, 40, 160),
    "white": (245, 245, 245),
}


def colour_images(folder: Path, n: int, seed: int) -> dict[str, str]:
    """Images of one dominant colour (with noise and a patch of another colour), captioned by its name."""
    import random

    rng, captions = random.Random(seed), {}
    folder.mkdir(parents=True)
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        im = Image.new(
            "RGB", (80, 80), tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[name])
        )
        x, y = rng.randint(0, 60), rng.randint(0, 60)
        im.paste(rng.choice(list(COLOURS.values())), (x, y, x + 20, y + 20))
        im.save(folder / f"{i:03d}.png")
        captions[f"{i:03d}.png"] = name
    (folder / "captions.json").write_text(json.dumps(captions))
    return captions


def greedy_captions(model, out_dir: Path, folder: Path, names) -> list[str]:
    from transformers import AutoProcessor

    family = families.Blip(model.config, AutoProcessor.from_pretrained(out_dir))
    return train_blip.sample_captions(family, model, [folder / n for n in names], 40)


@pytest.mark.slow
def test_learns_colour_names(tiny_blip_dir, tmp_path):
    """Full fine-tune of the tiny random BLIP: loss falls and held-out captions name the colour."""
    from transformers import BlipForConditionalGeneration

    colour_images(tmp_path / "train", 48, seed=0)
    held_out = colour_images(tmp_path / "test", 30, seed=1)
    out = tmp_path / "out"
    results = train_blip.main(
        args(
            tiny_blip_dir,
            tmp_path / "train",
            out,
            "--USE_LORA=False",
            "--LR=2e-3",
            "--EPOCHS=16",
            "--BATCH_SIZE=8",
            "--LOG_EVERY=1000",
            "--NUM_SAMPLE_CAPTIONS=0",
        )
    )
    epochs = [
        m["train_loss"]
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if m["type"] == "epoch"
    ]
    assert epochs[-1] < epochs[0] / 10 and results["final_val_loss"] < 1.0
    names = sorted(held_out)
    texts = greedy_captions(BlipForConditionalGeneration.from_pretrained(out), out, tmp_path / "test", names)
    right = sum(t.split()[:1] == [held_out[n]] for n, t in zip(names, texts, strict=True))
    assert right >= 0.9 * len(names), texts


@pytest.mark.slow
def test_learns_the_tutorial_mistakes_on_the_mirror(tiny_blip_dir, coco_mirror, tmp_path):
    """The tutorial's effect: after a short fine-tune, held-out captions end with 'thwisss iz funny.'.
    A random tiny model needs more than the tutorial's two q/k/v layers: all-linear at a higher lr."""
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    items = mirror_captions(coco_mirror)
    write_dataset(tmp_path / "train", items[:40], coco_mirror / "val2017")
    write_dataset(tmp_path / "test", items[-20:], coco_mirror / "val2017")
    out = tmp_path / "out"
    train_blip.main(
        args(
            tiny_blip_dir,
            tmp_path / "train",
            out,
            "--LORA_TARGET_MODULES=all-linear",
            "--LR=3e-3",
            "--EPOCHS=16",
            "--BATCH_SIZE=8",
            "--VAL_FRACTION=0",
            "--LOG_EVERY=1000",
            "--NUM_SAMPLE_CAPTIONS=0",
        )
    )
    model = PeftModel.from_pretrained(
        BlipForConditionalGeneration.from_pretrained(tiny_blip_dir), out
    ).get_base_model()
    names = [n for n, _ in items[-20:]]
    texts = greedy_captions(model, out, tmp_path / "test", names)
    assert sum(t.split()[-3:] == SUFFIX for t in texts) >= 0.95 * len(texts), texts
