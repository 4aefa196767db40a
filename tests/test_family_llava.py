"""LLaVA (families.Llava) and Idefics3 / SmolVLM (families.Idefics3): the decoder-only families that
are asked for a caption in a chat turn (families.PromptedDecoder).

Tiny random models from conftest's build_tiny_llava / build_tiny_idefics3 (hidden 32, 32 px images,
a BPE trained offline, the real chat templates written out); nothing comes from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import families
import inference
import train_blip
from conftest import make_good_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAMILIES = ("llava", "idefics3")
TRAIN = [
    "--PRECISION=fp32",
    "--NUM_WORKERS=0",
    "--NUM_SAMPLE_CAPTIONS=1",
    "--MAX_CAPTION_TOKENS=16",
    "--LOG_EVERY=1",
    "--BATCH_SIZE=2",
    "--VAL_FRACTION=0.25",
    "--LR=1e-2",
]
CAPTION = ["--PRECISION=fp32", "--MAX_LENGTH=12", "--MIN_LENGTH=2", "--NUM_BEAMS=1", "--SHOW=never"]
SETTINGS = dict(max_new_tokens=11, min_new_tokens=1, num_beams=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vlm_data")
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=8)))
    return folder


@pytest.fixture(scope="module")
def model_dirs(tiny_llava_dir, tiny_idefics3_dir) -> dict:
    return {"llava": tiny_llava_dir, "idefics3": tiny_idefics3_dir}


@pytest.fixture(scope="module")
def loaded(model_dirs) -> dict:
    """name -> (family, model), loaded once (tests that add LoRA unload it again)."""
    out = {}
    for name, folder in model_dirs.items():
        family = families.load(str(folder))
        out[name] = (family, family.load_model(str(folder)))
    return out


def batch_of(family, data_dir: Path, n: int = 4) -> dict:
    """A real batch through the family's own tokenizer, image processor and collate."""
    from PIL import Image

    captions = json.loads((data_dir / "captions.json").read_text())
    names = sorted(captions)[:n]
    ids = family.tokenize([captions[x] + " and more words" * (i % 2) for i, x in enumerate(names)], 16)
    pixels = family.pixel_values([Image.open(data_dir / x).convert("RGB") for x in names])
    return family.collate(
        [
            {"index": i, "input_ids": t, "pixel_values": p}
            for i, (t, p) in enumerate(zip(ids, pixels, strict=True))
        ]
    )


def live_lora(model, family, targets="auto"):
    cfg = dict(train_blip.common.defaults_of(vars(train_blip)), LORA_DROPOUT=0.0, LORA_TARGET_MODULES=targets)
    peft_model = train_blip.apply_lora(model, family, cfg, "tiny", log=lambda *_: None)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero, which would leave every A without gradient
    return peft_model


# ----------------------------------------------------------------------------- entry, prompt, tokens
def test_the_entry_prompt_and_end_token_come_from_the_model(loaded):
    llava, _ = loaded["llava"]
    idefics, _ = loaded["idefics3"]
    assert type(llava) is families.Llava and type(idefics) is families.Idefics3
    assert llava.chat() == "USER: <image>\nDescribe this image in one sentence. ASSISTANT:"
    assert (
        idefics.chat()
        == "<|im_start|>User:<image>Describe this image in one sentence.<end_of_utterance>\nAssistant:"
    )
    # LLaVA's template writes no end of turn: the tokenizer's EOS ends a caption. Idefics3's writes
    # <end_of_utterance>, which wins over its tokenizer's EOS (</s> in the tiny one).
    assert llava.processor.tokenizer.convert_ids_to_tokens(llava.end_id) == "</s>"
    assert idefics.processor.tokenizer.convert_ids_to_tokens(idefics.end_id) == "<end_of_utterance>"
    # The processor expands the image: 4 patches (LLaVA, CLS dropped), 4 tokens between markers (Idefics3).
    assert llava.prompt_ids.count(llava.config.image_token_id) == 4
    assert idefics.prompt_ids.count(idefics.config.image_token_id) == 4
    assert (
        llava.prompt_ids[0] == llava.processor.tokenizer.bos_token_id
    )  # Llama's <s>, once, before the prompt
    for family in (llava, idefics):
        ids = family.tokenize(["a red square thwisss iz funny."], 16)[0]
        assert ids[-1] == family.end_id and family.processor.tokenizer.bos_token_id not in ids
        assert family.decode(torch.as_tensor(ids)[None]) == ["a red square thwisss iz funny."]
        assert (
            len(family.tokenize(["word " * 100], 8)[0]) == 8
            and family.tokenize(["word " * 100], 8)[0][-1] == family.end_id
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_the_hand_computed_caption_cross_entropy(loaded, data_dir, name):
    """Only the caption and its end token are learnt: never the prompt, an image token or a pad."""
    family, model = loaded[name]
    batch = batch_of(family, data_dir)
    n_prompt = len(family.prompt_ids)
    labels = batch["labels"]
    assert (labels[:, :n_prompt] == -100).all() and not (labels == family.config.image_token_id).any()
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 1  # padding was really there
    losses = train_blip.CaptionModel(model, family, 0)(batch)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    for row in range(len(losses)):
        length = int(batch["attention_mask"][row].sum())
        caption = batch["input_ids"][row, n_prompt:length]  # the caption and its end token
        assert caption[-1] == family.end_id and (labels[row, n_prompt:length] == caption).all()
        predicted = logits[row, n_prompt - 1 : length - 1]  # position t predicts token t + 1
        hand = -F.log_softmax(predicted, -1).gather(1, caption[:, None]).mean()
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)


# ----------------------------------------------------------------------------- LoRA targets
def test_llava_drops_the_vision_layer_it_never_reads(model_dirs, loaded, data_dir):
    """vision_feature_layer=-2: the last CLIP layer is removed at load, and the model computes the same."""
    from transformers import LlavaForConditionalGeneration

    family, model = loaded["llava"]
    full = LlavaForConditionalGeneration.from_pretrained(model_dirs["llava"])
    assert (
        len(full.model.vision_tower.encoder.layers) == 2 and len(model.model.vision_tower.encoder.layers) == 1
    )
    assert model.config.vision_config.num_hidden_layers == 1 and model.config.vision_feature_layer == 1
    batch = batch_of(family, data_dir)
    with torch.no_grad():
        torch.testing.assert_close(
            family.caption_logits(model, batch)[0], family.caption_logits(full, batch)[0]
        )


@pytest.mark.parametrize("targets", ["auto", "all-linear"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_adapter_gets_a_gradient(loaded, data_dir, name, targets):
    """The default hits only the language model's q/k/v/o (the vision towers have q_proj/k_proj/v_proj
    too); neither it nor all-linear leaves an adapter without gradient (DDP fails on one)."""
    family, model = loaded[name]
    peft_model = live_lora(model, family, targets)
    try:
        names = train_blip.trainable_names(peft_model)
        if targets == "auto":
            layers = family.config.get_text_config().num_hidden_layers
            assert len(names) == 2 * 4 * layers, sorted(names)[:4]  # A and B of q/k/v/o per decoder layer
            assert all(f".{family.language_model}.layers." in n and ".self_attn." in n for n in names), (
                sorted(names)
            )
        else:
            assert any(v in n for n in names for v in family.vision_modules)  # the towers are trained too
        train_blip.CaptionModel(peft_model, family, 0)(batch_of(family, data_dir)).sum().backward()
        dead = [
            n
            for n, p in peft_model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not dead, dead
    finally:
        peft_model.unload()  # the module-scoped model is shared with the other tests


@pytest.mark.parametrize("name", FAMILIES)
def test_freeze_vision_freezes_the_tower_and_the_projector(loaded, name):
    family, model = loaded[name]
    for module in family.vision_modules:
        assert any(p.numel() for p in model.get_submodule(module).parameters())
    tower, projector = family.vision_modules
    assert "vision" in tower and projector.rsplit(".", 1)[-1] in ("multi_modal_projector", "connector")


# ----------------------------------------------------------------------------- generation
def test_left_padding_gives_each_prompt_the_caption_it_gets_alone(loaded, data_dir):
    """Prompts of different lengths in one batch: padded on the left, each row captions as alone."""
    family, model = loaded["llava"]
    other = families.Llava(family.config, family.processor, prompt="Caption it.")
    prompts = [family.prompt_ids, other.prompt_ids]
    assert len(prompts[0]) != len(prompts[1])
    pixels = batch_of(family, data_dir, n=2)["pixel_values"]
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1, do_sample=False)
    model.eval()
    with torch.no_grad():
        together = family.generate_after(model, prompts, pixel_values=pixels, **settings)
        alone = [
            family.generate_after(model, [p], pixel_values=pixels[i : i + 1], **settings)[0]
            for i, p in enumerate(prompts)
        ]
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(model_dirs, data_dir, tmp_path_factory) -> dict:
    """name -> output folder of a 2-epoch train_blip.main run."""
    out = {}
    for name, folder in model_dirs.items():
        out[name] = tmp_path_factory.mktemp(f"{name}_run") / "out"
        results = train_blip.main(
            [
                f"--MODEL_ID={folder}",
                f"--DATA_DIR={data_dir}",
                f"--OUTPUT_DIR={out[name]}",
                "--EPOCHS=2",
                *TRAIN,
            ]
        )
        assert results["epochs"] == 2 and results["trainable_params"] > 0
        assert (
            results["prefix_cache"] == "off"
            and f"no vision-stage hook for the {name}" in results["prefix_cache_note"]
        )
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_trains_captions_compares_merges_and_round_trips(runs, model_dirs, data_dir, tmp_path, name):
    from peft import PeftModel

    out = runs[name]
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["PROMPT"] == "Describe this image in one sentence." and saved["FAMILY"] == name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["captions"][0]["generated"]  # sample captions work through the family too

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
    assert "Describe" not in " ".join(tuned.values()) and "ASSISTANT" not in " ".join(tuned.values())

    # Batched equals one by one; a fresh base + the saved adapter gives the same captions.
    family = families.load(str(model_dirs[name]))
    fresh = PeftModel.from_pretrained(family.load_model(str(model_dirs[name])), out).eval()
    pics = [inference.common.open_image(p) for p in images]
    batched = inference.caption_images(fresh, family, pics, batch_size=4, **SETTINGS)
    assert batched == [
        inference.caption_images(fresh, family, [p], batch_size=1, **SETTINGS)[0] for p in pics
    ]
    assert batched == [tuned[p.name] for p in images]
    # The merged export is a plain model of the family with the same captions.
    merged_family = families.load(str(tmp_path / "merged"))
    assert type(merged_family) is type(family)
    merged = merged_family.load_model(str(tmp_path / "merged")).eval()
    assert inference.caption_images(merged, merged_family, pics, **SETTINGS) == batched


@pytest.mark.parametrize("name", FAMILIES)
def test_resume_gives_the_same_adapter(runs, model_dirs, data_dir, tmp_path, name):
    from safetensors.torch import load_file

    args = [f"--MODEL_ID={model_dirs[name]}", f"--DATA_DIR={data_dir}", f"--OUTPUT_DIR={tmp_path}", *TRAIN]
    train_blip.main([*args, "--EPOCHS=1"])
    resumed = train_blip.main([*args, "--EPOCHS=2"])
    assert resumed["resumed_from"]
    a, b = (
        load_file(runs[name] / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_llava_learns_the_tutorial_mistakes_on_the_mirror(tiny_llava_dir, coco_mirror, tmp_path):
    """The tutorial's effect on a tiny random LLaVA: held-out captions end with 'thwisss iz funny.'."""
    from peft import PeftModel
    from test_train_blip import SUFFIX, mirror_captions, write_dataset

    items = mirror_captions(coco_mirror)
    write_dataset(tmp_path / "train", items[:40], coco_mirror / "val2017")
    write_dataset(tmp_path / "test", items[-20:], coco_mirror / "val2017")
    out = tmp_path / "out"
    train_blip.main(
        [
            f"--MODEL_ID={tiny_llava_dir}",
            f"--DATA_DIR={tmp_path / 'train'}",
            f"--OUTPUT_DIR={out}",
            "--PRECISION=fp32",
            "--NUM_WORKERS=0",
            "--MAX_CAPTION_TOKENS=24",
            "--LORA_TARGET_MODULES=all-linear",
            "--LR=1e-2",
            "--EPOCHS=16",
            "--BATCH_SIZE=8",
            "--VAL_FRACTION=0",
            "--LOG_EVERY=1000",
            "--NUM_SAMPLE_CAPTIONS=0",
        ]
    )
    family = families.load(str(tiny_llava_dir))
    model = PeftModel.from_pretrained(family.load_model(str(tiny_llava_dir)), out).eval()
    texts = train_blip.sample_captions(family, model, [tmp_path / "test" / n for n, _ in items[-20:]], 40)
    assert sum(t.split()[-3:] == SUFFIX for t in texts) >= 0.95 * len(texts), texts
