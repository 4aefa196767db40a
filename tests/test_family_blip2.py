"""BLIP-2 (families.Blip2) with an OPT language model (decoder-only) and a Flan-T5 one (encoder-decoder),
through the unchanged scripts. Tiny random models from conftest.build_tiny_blip2; nothing from the Hub.

What each test guards: the image tokens in every sequence (BLIP-2 loses the image silently without
them), the end token appended for OPT, labels on the caption only, the T5 decoder's unshifted labels,
the loss by hand, LoRA on the language model only with no dead adapter, FREEZE_VISION, batched =
one by one, the prompt cut from the captions, and train -> resume -> caption -> compare -> merge.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import families
import inference
import train_blip
from common import UserError
from conftest import build_tiny_blip2, make_good_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LMS = ("opt", "t5")
TRAIN = [
    "--PRECISION=fp32",
    "--NUM_WORKERS=0",
    "--NUM_SAMPLE_CAPTIONS=1",
    "--MAX_CAPTION_TOKENS=16",
    "--LOG_EVERY=1",
    "--BATCH_SIZE=2",
    "--VAL_FRACTION=0.25",
]
CAPTION = ["--PRECISION=fp32", "--MAX_LENGTH=8", "--MIN_LENGTH=2", "--NUM_BEAMS=1", "--SHOW=never"]
SETTINGS = dict(max_new_tokens=7, min_new_tokens=1, num_beams=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blip2_data")
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=8)))
    return folder


@pytest.fixture(scope="module")
def model_dirs(tiny_blip2_opt_dir, tiny_blip2_t5_dir) -> dict:
    return {"opt": tiny_blip2_opt_dir, "t5": tiny_blip2_t5_dir}


@pytest.fixture(scope="module")
def loaded(model_dirs) -> dict:
    """{lm: (family, model)}, shared by the tests that do not train."""
    out = {}
    for lm, folder in model_dirs.items():
        family = families.load(str(folder))
        out[lm] = family, family.load_model(str(folder))
    return out


def captions_of(data_dir: Path, n: int = 4) -> list[tuple[str, str]]:
    captions = json.loads((data_dir / "captions.json").read_text())
    return [(x, captions[x] + " and more words" * (i % 2)) for i, x in enumerate(sorted(captions)[:n])]


def batch_of(family, data_dir: Path, n: int = 4) -> dict:
    """A real batch through the family's own tokenizer, image processor and collate (rows of two lengths)."""
    from PIL import Image

    items = captions_of(data_dir, n)
    ids = family.tokenize([c for _, c in items], 16)
    pixels = family.pixel_values([Image.open(data_dir / x).convert("RGB") for x, _ in items])
    return family.collate(
        [
            {"index": i, "input_ids": t, "pixel_values": p}
            for i, (t, p) in enumerate(zip(ids, pixels, strict=True))
        ]
    )


def live_lora(model, family, targets="auto", **cfg):
    cfg = dict(
        train_blip.common.defaults_of(vars(train_blip)), LORA_DROPOUT=0.0, LORA_TARGET_MODULES=targets, **cfg
    )
    peft_model = train_blip.apply_lora(model, family, cfg, "blip2", log=lambda *_: None)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero, which would leave every A without gradient
    return peft_model


# ----------------------------------------------------------------------------- the entry
@pytest.mark.parametrize("lm", LMS)
def test_the_entry_and_its_sequences_are_the_processors(lm, loaded, data_dir):
    """Blip2Processor's layout: <image> x num_query_tokens, then OPT's BOS + prompt, or T5's prompt + </s>."""
    from PIL import Image

    family, _ = loaded[lm]
    assert type(family) is families.Blip2 and family.encoder_decoder == (lm == "t5")
    assert family.prompt == "" and family.takes_prompt
    image = Image.open(sorted(data_dir.glob("*.jpg"))[0])
    for prompt in ("", "a photo of"):
        fam = families.Blip2(family.config, family.processor, prompt)
        assert fam.prefix == family.processor(images=image, text=prompt).input_ids[0]
        assert fam.prefix.count(family.config.image_token_id) == family.config.num_query_tokens == 4


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("lm", LMS)
def test_loss_is_the_hand_computed_caption_cross_entropy(lm, loaded, data_dir):
    """One caption at a time, built by hand from the processor (image tokens, BOS/prompt) and the
    tokenizer (caption + </s>), through the model's own forward: the batched, padded per-caption
    loss equals the cross-entropy over exactly the caption tokens and the end token."""
    from PIL import Image

    family, model = loaded[lm]
    tok = family.processor.tokenizer
    batch = batch_of(family, data_dir)
    losses = train_blip.CaptionModel(model, family, 0)(batch)
    assert (
        len({int(m.sum()) for m in batch.get("decoder_attention_mask", batch["attention_mask"])}) > 1
    )  # padded
    for row, (name, caption) in enumerate(captions_of(data_dir)):
        enc = family.processor(
            images=Image.open(data_dir / name).convert("RGB"), text="", return_tensors="pt"
        )
        target = torch.tensor([tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]])
        with torch.no_grad():
            if lm == "opt":
                ids = torch.cat([enc.input_ids, target], 1)
                logits = model(pixel_values=enc.pixel_values, input_ids=ids).logits
                predicted = logits[0, enc.input_ids.shape[1] - 1 : -1]  # position t predicts token t + 1
            else:
                start = torch.tensor([[model.config.text_config.decoder_start_token_id]])
                predicted = model(
                    pixel_values=enc.pixel_values,
                    input_ids=enc.input_ids,
                    decoder_input_ids=torch.cat([start, target[:, :-1]], 1),
                ).logits[0]
        hand = -F.log_softmax(predicted, -1).gather(1, target[0][:, None]).mean()
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)


@pytest.mark.parametrize("lm", LMS)
def test_the_image_reaches_the_loss(lm, loaded, data_dir):
    """Without its <image> tokens BLIP-2 would ignore the pixels and raise nothing: other images,
    other losses."""
    family, model = loaded[lm]
    batch = batch_of(family, data_dir)
    with torch.no_grad():
        a = train_blip.CaptionModel(model, family, 0)(batch)
        b = train_blip.CaptionModel(model, family, 0)(
            {**batch, "pixel_values": batch["pixel_values"].flip(0)}
        )
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("lm", LMS)
def test_the_vision_stages_equal_the_models_own_forward(lm, loaded, data_dir):
    """The hooked path (vision stages -> queries put in place of <image> -> language model) and the
    model's own forward give the same logits; its generate() and ours, the same captions."""
    family, model = loaded[lm]
    model.eval()
    batch = batch_of(family, data_dir)
    with torch.no_grad():
        embeds = families.run_stages(family.vision_stages(model), batch["pixel_values"])
        assert embeds.shape[1:] == family.prefix_shape(model, len(family.vision_stages(model)))
        torch.testing.assert_close(
            family.caption_logits(model, batch, embeds)[0], family.caption_logits(model, batch)[0]
        )
        plain = family.generate(model, batch["pixel_values"], **SETTINGS)
        assert torch.equal(family.generate_from_embeds(model, embeds, **SETTINGS), plain)


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("lm", LMS)
def test_default_lora_is_the_language_models_attention_and_every_adapter_gets_a_gradient(
    lm, loaded, data_dir
):
    family, model = loaded[lm]
    peft_model = live_lora(model, family)
    try:
        names = train_blip.trainable_names(peft_model)
        layer = r".q_proj." if lm == "opt" else ".q."
        assert names and all(".language_model." in n for n in names), sorted(names)[:4]
        assert any(layer in n for n in names)
        train_blip.CaptionModel(peft_model, family, 0)(batch_of(family, data_dir)).sum().backward()
        dead = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not dead, dead
    finally:
        peft_model.unload()  # the module-scoped model is shared with the other tests


@pytest.mark.parametrize("lm", LMS)
def test_the_tutorials_names_work_or_name_the_nearest(lm, loaded):
    """The tutorial's BLIP-2 row suggests q_proj, k_proj: OPT has them (in its language model only);
    T5 calls them q, k, and gets the nearest real names."""
    family, model = loaded[lm]
    if lm == "t5":
        with pytest.raises(UserError, match=r"'q_proj' matches no module of the model; nearest real names: "):
            live_lora(model, family, ["q_proj", "k_proj"])
        return
    peft_model = live_lora(model, family, ["q_proj", "k_proj"])
    try:
        assert all(".language_model." in n for n in train_blip.trainable_names(peft_model))
    finally:
        peft_model.unload()


@pytest.mark.parametrize("lm", LMS)
def test_freeze_vision_freezes_the_tower_the_qformer_its_queries_and_the_projection(lm, model_dirs):
    cfg = dict(
        train_blip.common.defaults_of(vars(train_blip)),
        MODEL_ID=str(model_dirs[lm]),
        FREEZE_VISION=True,
        USE_LORA=False,
    )
    run = types.SimpleNamespace(log=lambda *_: None, is_main=False)
    _, model = train_blip.build_model(cfg, run)
    trained = train_blip.trainable_names(model)
    assert trained and all(n.startswith("language_model.") for n in trained), sorted(trained)[:4]
    _, model = train_blip.build_model({**cfg, "USE_LORA": True, "LORA_TARGET_MODULES": "all-linear"}, run)
    trained = train_blip.trainable_names(model)
    assert trained and all(".language_model." in n for n in trained), sorted(trained)[:4]


# ----------------------------------------------------------------------------- captions
@pytest.mark.parametrize("lm", LMS)
def test_captions_are_caption_tokens_only_and_batched_equals_one_by_one(lm, loaded, data_dir):
    """generate() returns the caption only (no image tokens, BOS or prompt), MIN/MAX count its
    tokens, and a batch captions as each image alone would, with a prompt too."""
    family, model = loaded[lm]
    model.eval()
    pics = [inference.common.open_image(p) for p in sorted(data_dir.glob("*.jpg"))[:4]]
    prompted = families.Blip2(family.config, family.processor, "a photo of")
    for fam in (family, prompted):
        ids = fam.generate(model, fam.pixel_values(pics), max_new_tokens=5, min_new_tokens=5, num_beams=1)
        assert ids.shape == (4, 5) and not (ids == family.config.image_token_id).any()
        batched = inference.caption_images(model, fam, pics, batch_size=4, **SETTINGS)
        assert batched == [
            inference.caption_images(model, fam, [p], batch_size=1, **SETTINGS)[0] for p in pics
        ]
        assert all(not t.startswith("a photo of") for t in batched) and all(batched)


# ----------------------------------------------------------------------------- through the scripts
@pytest.fixture(scope="module")
def runs(model_dirs, data_dir, tmp_path_factory) -> dict:
    out = {}
    for lm, folder in model_dirs.items():
        target = tmp_path_factory.mktemp(f"blip2_{lm}_run") / "out"
        started = time.perf_counter()
        results = train_blip.main(
            [
                f"--MODEL_ID={folder}",
                f"--DATA_DIR={data_dir}",
                f"--OUTPUT_DIR={target}",
                "--EPOCHS=2",
                "--LR=1e-2",
                *TRAIN,
            ]
        )
        out[lm] = target, results, time.perf_counter() - started
    return out


@pytest.mark.parametrize("lm", LMS)
def test_trains_with_the_prefix_cache_and_resumes_to_the_same_adapter(
    lm, runs, model_dirs, data_dir, tmp_path
):
    from safetensors.torch import load_file

    straight, results, _ = runs[lm]
    assert results["epochs"] == 2 and results["trainable_params"] > 0
    assert results["prefix_cache"] == "ram" and "vision layers" in results["prefix_cache_note"]
    saved = json.loads((straight / "training_config.json").read_text())
    assert saved["FAMILY"] == "blip-2" and saved["PROMPT"] == ""
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["captions"][0]["generated"]
    args = [
        f"--MODEL_ID={model_dirs[lm]}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={tmp_path}",
        "--LR=1e-2",
        *TRAIN,
    ]
    train_blip.main([*args, "--EPOCHS=1"])
    assert train_blip.main([*args, "--EPOCHS=2"])["resumed_from"]
    a, b = (
        load_file(straight / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lm", LMS)
def test_captions_compares_merges_and_round_trips(lm, runs, model_dirs, data_dir, tmp_path):
    from peft import PeftModel

    out, _, _ = runs[lm]
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

    family = families.load(str(model_dirs[lm]))
    fresh = PeftModel.from_pretrained(family.load_model(str(model_dirs[lm])), out).eval()
    pics = [inference.common.open_image(p) for p in images]
    batched = inference.caption_images(fresh, family, pics, batch_size=4, **SETTINGS)
    assert batched == [tuned[p.name] for p in images]
    # COMPARE_BASE is the adapter switched off: the base model's own captions.
    base = families.load(str(model_dirs[lm])).load_model(str(model_dirs[lm])).eval()
    base_captions = {r["file"]: r["base"] for r in result["images"]}
    assert [base_captions[p.name] for p in images] == inference.caption_images(base, family, pics, **SETTINGS)
    merged_family = families.load(str(tmp_path / "merged"))
    merged = merged_family.load_model(str(tmp_path / "merged")).eval()
    assert inference.caption_images(merged, merged_family, pics, **SETTINGS) == batched


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_opt_learns_the_tutorial_mistakes_on_the_mirror(coco_mirror, tmp_path):
    """The tutorial's effect on BLIP-2 (OPT): held-out captions end with 'thwisss iz funny.'. A random
    tiny model needs all-linear LoRA and word embeddings large enough for its tied, frozen head."""
    from peft import PeftModel
    from test_train_blip import SUFFIX, mirror_captions, write_dataset

    tiny_blip2_opt_dir = build_tiny_blip2(tmp_path / "model", "opt", embed_std=0.5)

    items = mirror_captions(coco_mirror)
    write_dataset(tmp_path / "train", items[:40], coco_mirror / "val2017")
    write_dataset(tmp_path / "test", items[-20:], coco_mirror / "val2017")
    out = tmp_path / "out"
    train_blip.main(
        [
            f"--MODEL_ID={tiny_blip2_opt_dir}",
            f"--DATA_DIR={tmp_path / 'train'}",
            f"--OUTPUT_DIR={out}",
            "--PRECISION=fp32",
            "--NUM_WORKERS=0",
            "--MAX_CAPTION_TOKENS=24",
            "--LORA_TARGET_MODULES=all-linear",
            "--LR=3e-3",
            "--EPOCHS=16",
            "--BATCH_SIZE=8",
            "--VAL_FRACTION=0",
            "--LOG_EVERY=1000",
            "--NUM_SAMPLE_CAPTIONS=0",
        ]
    )
    family = families.load(str(tiny_blip2_opt_dir))
    model = PeftModel.from_pretrained(family.load_model(str(tiny_blip2_opt_dir)), out).eval()
    names = [n for n, _ in items[-20:]]
    texts = train_blip.sample_captions(family, model, [tmp_path / "test" / n for n in names], 40)
    assert sum(t.split()[-3:] == SUFFIX for t in texts) >= 0.95 * len(texts), texts
