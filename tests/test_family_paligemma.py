"""PaliGemma (families.PaliGemma) on a tiny random model: a prefix-LM with the image tokens first."""

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
    train,
)

import families
import train_blip

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("paligemma_data"))


@pytest.fixture(scope="module")
def paligemma(tiny_paligemma_dir):
    family = families.load(str(tiny_paligemma_dir))
    return family, family.load_model(str(tiny_paligemma_dir))


def test_the_batch_is_the_processors_and_the_loss_is_the_hand_computed_caption_cross_entropy(
    paligemma, data_dir
):
    """Our batch equals what PaliGemmaProcessor(suffix=...) builds for training: image tokens first,
    <bos> + "caption en" + newline, the caption + <eos>; token_type_ids 0 on the prefix (seen both
    ways) and 1 on the caption; labels on the caption and <eos> only. The loss equals a cross-entropy
    by hand over exactly those tokens, from a full forward of the processor's own batch."""
    family, model = paligemma
    assert type(family) is families.PaliGemma and family.prompt == "caption en"
    batch = batch_of(family, data_dir)
    texts, images = captions_and_images(data_dir)
    ref = family.processor(
        images=images,
        text=[family.prompt] * 4,
        suffix=texts,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )  # training pads on the right
    assert torch.equal(batch["input_ids"], ref["input_ids"]) and torch.equal(batch["labels"], ref["labels"])
    assert torch.equal(family.model_inputs(batch)["token_type_ids"], ref["token_type_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 1  # padding was really there

    losses = train_blip.CaptionModel(model, family, 0)(batch)
    with torch.no_grad():
        logits = model(**ref).logits
    n = len(family.prefix)
    assert n == 4 + 1 + len(family.processor.tokenizer("caption en\n", add_special_tokens=False).input_ids)
    for row in range(4):
        length = int(ref["attention_mask"][row].sum())
        hand = hand_ce(logits[row, n - 1 : length - 1], ref["input_ids"][row, n:length])
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)


def test_default_lora_is_the_language_models_attention_and_every_adapter_gets_a_gradient(paligemma, data_dir):
    family, model = paligemma
    assert set(family.vision_modules) == {"model.vision_tower", "model.multi_modal_projector"}
    count = check_every_adapter_gets_a_gradient(family, model, data_dir)
    # 2 layers x (q 32->32, k 32->16, v 32->16, o 32->32) at r=16: 16 x (64 + 48 + 48 + 64) per layer
    assert count == 2 * 16 * (64 + 48 + 48 + 64) == 7168


@pytest.fixture(scope="module")
def run(tiny_paligemma_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("paligemma_run") / "out"
    return out, train(tiny_paligemma_dir, data_dir, out)


def test_trains_through_train_blip(run):
    check_trained_run(*run, "paligemma", "caption en")


def test_resume_gives_the_same_adapter(run, tiny_paligemma_dir, data_dir, tmp_path):
    check_resume_gives_the_same_adapter(run[0], tiny_paligemma_dir, data_dir, tmp_path)


def test_captions_compares_merges_and_round_trips(run, tiny_paligemma_dir, data_dir, tmp_path):
    check_captions_compare_merge_round_trip(run[0], tiny_paligemma_dir, data_dir, tmp_path)
