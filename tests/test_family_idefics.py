"""IDEFICS (families.Idefics), Hugging Face's open Flamingo, on a tiny random model: a LLaMA decoder
with gated cross-attention to the image."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    batch_of,
    captions_and_images,
    check_captions_compare_merge_round_trip,
    check_every_adapter_gets_a_gradient,
    check_resume_gives_the_same_adapter,
    check_trained_run,
    hand_ce,
    make_data,
    nonzero_lora_b,
    train,
)

import families
import train_blip
from conftest import build_tiny_idefics

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("idefics_data"))


@pytest.fixture(scope="module")
def idefics(tiny_idefics_dir):
    family = families.load(str(tiny_idefics_dir))
    return family, family.load_model(str(tiny_idefics_dir))


def test_the_prompt_is_the_processors_and_the_loss_is_the_hand_computed_caption_cross_entropy(
    idefics, data_dir
):
    """<s><fake><image><fake>Caption: as the processor lays it out, image_attention_mask on from the
    <image> token on; the loss covers the caption and </s> only, by hand from a full forward."""
    family, model = idefics
    assert type(family) is families.Idefics and family.prompt == "Caption:"
    texts, images = captions_and_images(data_dir)
    enc = family.processor(images=images, text=[family.prompt] * 4, return_tensors="pt")
    assert all(row == family.prefix for row in enc["input_ids"].tolist())
    batch = batch_of(family, data_dir)
    n = len(family.prefix)
    mask = family.model_inputs(batch)["image_attention_mask"]
    assert torch.equal(mask[:, :n], enc["image_attention_mask"]) and mask[:, n:].all()
    losses = train_blip.CaptionModel(model, family, 0)(batch)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=enc["pixel_values"],
            image_attention_mask=mask,
        ).logits
    for row in range(4):
        length = int(batch["attention_mask"][row].sum())
        hand = hand_ce(logits[row, n - 1 : length - 1], batch["input_ids"][row, n:length])
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 1  # padding was really there


def test_default_lora_is_the_decoders_self_attention_and_every_adapter_gets_a_gradient(idefics, data_dir):
    family, model = idefics
    assert set(family.vision_modules) == {"model.vision_model", "model.perceiver_resampler"}
    count = check_every_adapter_gets_a_gradient(
        family, model, data_dir, must_not_contain=("vision", "cross_attn")
    )
    assert count == 2 * 4 * 16 * 64 == 8192  # 2 layers x q, k, v, o (32 -> 32) at r=16


def test_gated_cross_attention_adapters_are_dead_while_the_gates_are_closed(data_dir, tmp_path):
    """Why the default leaves the gated cross-attention alone: in a fresh IDEFICS (gates at 0)
    LoRA there gets no gradient at all (and the image has no effect)."""
    from peft import LoraConfig, get_peft_model

    closed = build_tiny_idefics(tmp_path / "closed", gates="zeros")
    family = families.load(str(closed))
    model = get_peft_model(
        family.load_model(str(closed)),
        LoraConfig(r=4, target_modules=["cross_attn.q_proj", "cross_attn.v_proj"]),
    )
    nonzero_lora_b(model)
    train_blip.CaptionModel(model, family, 0)(batch_of(family, data_dir)).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)


@pytest.fixture(scope="module")
def run(tiny_idefics_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("idefics_run") / "out"
    return out, train(tiny_idefics_dir, data_dir, out)


def test_trains_through_train_blip(run):
    check_trained_run(*run, "idefics", "Caption:")


def test_resume_gives_the_same_adapter(run, tiny_idefics_dir, data_dir, tmp_path):
    check_resume_gives_the_same_adapter(run[0], tiny_idefics_dir, data_dir, tmp_path)


def test_captions_compares_merges_and_round_trips(run, tiny_idefics_dir, data_dir, tmp_path):
    check_captions_compare_merge_round_trip(run[0], tiny_idefics_dir, data_dir, tmp_path)
