"""Florence-2 (families.Florence2) on a tiny random model: an encoder-decoder."""

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
    return make_data(tmp_path_factory.mktemp("florence2_data"))


@pytest.fixture(scope="module")
def florence2(tiny_florence2_dir):
    family = families.load(str(tiny_florence2_dir))
    return family, family.load_model(str(tiny_florence2_dir))


def test_the_prompt_goes_to_the_encoder_and_the_loss_is_the_hand_computed_caption_cross_entropy(
    florence2, data_dir
):
    """The encoder reads the processor's "<CAPTION>" batch (17 image tokens, <s>, the question, </s>);
    the decoder's labels are <s> caption </s> as the model's own labels= path shifts them, and the
    loss covers the caption and </s>, never <s> nor a pad."""
    family, model = florence2
    assert type(family) is families.Florence2 and family.prompt == "<CAPTION>"
    batch = batch_of(family, data_dir)
    texts, images = captions_and_images(data_dir)
    enc = family.processor(images=images, text=[family.prompt] * 4, return_tensors="pt")
    assert all(list(row) == family.prefix for row in enc["input_ids"].tolist())
    tok = family.processor.tokenizer
    losses = train_blip.CaptionModel(model, family, 0)(batch)
    for row, text in enumerate(texts):
        target = torch.tensor(
            [[tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids, tok.eos_token_id]]
        )
        with torch.no_grad():  # the model's own training path: labels, shifted right to </s> <s> ...
            logits = model(
                input_ids=enc["input_ids"][row : row + 1],
                pixel_values=enc["pixel_values"][row : row + 1],
                labels=target,
            ).logits[0]
        hand = hand_ce(logits[1:], target[0, 1:])  # every token after <s>
        assert losses[row].item() == pytest.approx(hand.item(), rel=1e-5)
    assert len(set(int(m.sum()) for m in batch["attention_mask"])) > 1  # padding was really there


def test_default_lora_is_the_language_models_attention_and_every_adapter_gets_a_gradient(florence2, data_dir):
    family, model = florence2
    assert set(family.vision_modules) == {"model.vision_tower", "model.multi_modal_projector"}
    count = check_every_adapter_gets_a_gradient(family, model, data_dir)
    # encoder self-attention + decoder self- and cross-attention: 3 x 4 projections of 32 -> 32, r=16
    assert count == 3 * 4 * 16 * 64 == 12288


@pytest.fixture(scope="module")
def run(tiny_florence2_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("florence2_run") / "out"
    return out, train(tiny_florence2_dir, data_dir, out)


def test_trains_through_train_blip(run):
    check_trained_run(*run, "florence2", "<CAPTION>")


def test_resume_gives_the_same_adapter(run, tiny_florence2_dir, data_dir, tmp_path):
    check_resume_gives_the_same_adapter(run[0], tiny_florence2_dir, data_dir, tmp_path)


def test_captions_compares_merges_and_round_trips(run, tiny_florence2_dir, data_dir, tmp_path):
    check_captions_compare_merge_round_trip(run[0], tiny_florence2_dir, data_dir, tmp_path)
