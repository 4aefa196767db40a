"""Exactness of the speed levers that live outside the three scripts.

- families.enable_blip_sdpa: the SDPA attention path gives the eager outputs (vision states, loss, logits,
  LoRA gradients, generated captions) in fp32, before or after get_peft_model, and falls back to
  eager when attention maps are requested.
- bf16 autocast: one training step's loss is within 2% of the fp32 loss on the same real batch.
- families._sdpa in bf16 with gradients on a CPU: matmul + softmax, as close to fp32 as bf16 SDPA.
- common.resolve_precision("auto", "cpu") picks bf16 exactly where the CPU runs bf16 matmuls faster than fp32.

The speed itself is measured in benchmarks/, not here.
"""

from __future__ import annotations

import contextlib
import json
import zipfile

import pytest
import torch

import common
import families
from download_coco import add_mistakes

TARGETS = list(families.Blip.lora_targets)  # the tutorial's (they exist in the tiny BLIP too)
N_IMAGES = 4
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def training_batch(model_dir, coco_mirror, n_images=N_IMAGES):
    """A batch as training sees it: mirror photos, their first captions with the mistakes, the real
    tokenizer, [DEC] BOS at position 0 and pads masked out of the labels."""
    with zipfile.ZipFile(coco_mirror / "annotations" / "annotations_trainval2017.zip") as z:
        ann = json.loads(z.read("annotations/captions_val2017.json"))
    names = {im["id"]: im["file_name"] for im in ann["images"]}
    first = {}
    for a in ann["annotations"]:
        first.setdefault(names[a["image_id"]], a["caption"])
    files = sorted(first)[:n_images]
    family = families.load(str(model_dir))
    images = [common.open_image(coco_mirror / "val2017" / f) for f in files]
    ids = family.tokenize([add_mistakes(first[f]) for f in files], 64)
    batch = family.collate(
        [
            {"index": i, "input_ids": x, "pixel_values": p}
            for i, (x, p) in enumerate(zip(ids, family.pixel_values(images)))
        ]
    )
    assert (batch["labels"] == -100).any(), "captions of different lengths should give some padding"
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}


@pytest.fixture(scope="module")
def real_batch(tiny_blip_dir, coco_mirror):
    return training_batch(tiny_blip_dir, coco_mirror)


def _load(model_dir, sdpa: str | None = None):
    """Tiny BLIP with tutorial LoRA; sdpa = None | 'before' | 'after' get_peft_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)  # peft draws the LoRA A matrices at random
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    if sdpa == "before":
        assert families.enable_blip_sdpa(model) == 10 + 2 * 7  # vision layers + text self/cross per layer
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if sdpa == "after":
        assert families.enable_blip_sdpa(model) == 10 + 2 * 7
    # peft starts B at zero, which makes every A gradient zero; give B seeded values so the
    # gradient check covers both matrices.
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.02, generator=gen)
    return model


def _step(model, batch, precision="fp32"):
    """One training forward/backward in train mode (LoRA dropout on, same seed each call)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


# Greedy and beam search, both through the KV cache (self- and cross-attention caches).
GENERATE = (dict(max_new_tokens=12, min_new_tokens=12), dict(max_new_tokens=12, num_beams=3))


def _reference(model, batch) -> dict:
    """Everything the SDPA path is compared against, computed once per model."""
    out, grads = _step(model, batch)
    bf16, bf16_grads = _step(model, batch, "bf16")
    model.eval()
    captions = [model.generate(pixel_values=batch["pixel_values"], **kw) for kw in GENERATE]
    return dict(model=model, out=out, grads=grads, bf16=bf16, bf16_grads=bf16_grads, captions=captions)


@contextlib.contextmanager
def counting_sdpa():
    """Count calls of torch's fused attention: proof that the patched path really runs."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


@pytest.fixture(scope="module")
def eager(tiny_blip_dir, real_batch):
    return _reference(_load(tiny_blip_dir), real_batch)


@pytest.mark.parametrize("when", ["before", "after"])
def test_sdpa_matches_eager_in_fp32(tiny_blip_dir, real_batch, eager, when):
    with counting_sdpa() as calls, torch.no_grad():
        eager["model"].eval()(**real_batch)
    assert not calls  # BLIP's own attention is eager: the comparison below is eager vs SDPA
    with counting_sdpa() as calls:
        sdpa = _reference(_load(tiny_blip_dir, sdpa=when), real_batch)
    # Two training steps (fp32, bf16) run 10 vision + 7 text self + 7 text cross attentions each.
    assert len(calls) >= 2 * (10 + 7 + 7), len(calls)
    out_e, out_s = eager["out"], sdpa["out"]
    torch.testing.assert_close(out_s.last_hidden_state, out_e.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s.logits, out_e.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s.loss, out_e.loss, rtol=1e-6, atol=1e-6)
    grads_e, grads_s = eager["grads"], sdpa["grads"]
    assert len(grads_e) == 20 and grads_s.keys() == grads_e.keys()  # A and B of 10 LoRA layers
    for name in grads_e:
        assert grads_e[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_s[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
    for ids_s, ids_e in zip(sdpa["captions"], eager["captions"]):
        assert torch.equal(ids_s, ids_e)

    # bf16 autocast: q/k/v are bf16 while the additive masks stay fp32, so the mask cast must happen;
    # the two paths round differently, so compare loosely.
    assert sdpa["bf16"].loss.dtype == torch.float32
    assert abs(sdpa["bf16"].loss.item() - eager["bf16"].loss.item()) <= 0.01 * eager["bf16"].loss.item()


def test_sdpa_falls_back_to_eager_when_attentions_are_requested(tiny_blip_dir, real_batch, eager):
    sdpa = _load(tiny_blip_dir, sdpa="after").eval()
    batch = {k: v for k, v in real_batch.items() if k != "labels"}
    attentions = {}
    for name, model in (("eager", eager["model"]), ("sdpa", sdpa)):
        with torch.no_grad():
            vision = model(**batch, output_attentions=True)
            text = model.text_decoder(
                input_ids=batch["input_ids"],
                encoder_hidden_states=vision.image_embeds,
                output_attentions=True,
            )
        attentions[name] = (vision.attentions, text.attentions, text.cross_attentions)
    assert [len(a) for a in attentions["sdpa"]] == [10, 7, 7]  # vision layers, text self, text cross
    for group_s, group_e in zip(attentions["sdpa"], attentions["eager"]):
        for a, b in zip(group_s, group_e):
            torch.testing.assert_close(a, b)


def test_sdpa_respects_dropout_and_training_mode(tiny_blip_dir, real_batch):
    eager, sdpa = _load(tiny_blip_dir), _load(tiny_blip_dir, sdpa="after")
    for model in (eager, sdpa):
        for module in model.modules():
            if module.__class__.__name__ in ("BlipAttention", "BlipTextSelfAttention"):
                module.dropout.p = 0.3  # BLIP's configs say 0.0; check the path honours a real p
    pixels = real_batch["pixel_values"]
    sdpa.train()
    with torch.no_grad():
        a, b = (sdpa.base_model.model.vision_model(pixel_values=pixels).last_hidden_state for _ in range(2))
    assert not torch.equal(a, b), "attention dropout should be active in train mode"
    eager.eval(), sdpa.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa.base_model.model.vision_model(pixel_values=pixels).last_hidden_state,
            eager.base_model.model.vision_model(pixel_values=pixels).last_hidden_state,
            rtol=1e-5,
            atol=1e-5,
        )


def test_enable_sdpa_is_idempotent_and_can_skip_text(tiny_blip_dir):
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    assert families.enable_blip_sdpa(model, text=False) == 10
    assert families.enable_blip_sdpa(model) == 24
    assert families.enable_blip_sdpa(model) == 24


def _attention_case(q_len, kv_len, mask):
    """Seeded q/k/v (batch 2, 4 heads, head size 16), an output gradient, and a mask: None, an
    additive float mask hiding the last 3 keys, or a causal bool mask."""
    gen = torch.Generator().manual_seed(q_len * 100 + kv_len)
    q, g = (torch.randn(2, 4, q_len, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 4, kv_len, 16, generator=gen) for _ in range(2))
    if mask == "additive":
        mask = torch.zeros(2, 1, 1, kv_len)
        mask[..., -3:] = torch.finfo(torch.float32).min
    elif mask == "causal":
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    return q, k, v, g, mask


def _attend(attend, q, k, v, g, mask, dtype):
    """attend(q, k, v, mask) in `dtype` with gradients: (output, dq, dk, dv) in fp32."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = attend(*leaves, mask)
    out.backward(g.to(dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


@pytest.mark.parametrize("q_len, kv_len, mask", [(33, 33, None), (7, 33, "additive"), (9, 9, "causal")])
def test_bf16_cpu_training_attention_takes_matmuls_and_matches_sdpa(q_len, kv_len, mask):
    """families._sdpa trains bf16 on a CPU through matmul + softmax (the fused kernel's backward is
    slower there); its output and gradients are as close to fp32 as bf16 SDPA's, and without
    gradients (captioning, the prefix cache) the fused kernel still runs."""
    q, k, v, g, mask = _attention_case(q_len, kv_len, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    exact = _attend(lambda *a: sdpa(*a[:3], attn_mask=a[3]), q, k, v, g, mask, torch.float32)
    mask_bf16 = mask.bfloat16() if mask is not None and mask.dtype.is_floating_point else mask
    fused = _attend(lambda *a: sdpa(*a[:3], attn_mask=mask_bf16), q, k, v, g, mask, torch.bfloat16)
    with counting_sdpa() as calls:
        ours = _attend(lambda *a: families._sdpa(*a, 0.0), q, k, v, g, mask, torch.bfloat16)
    assert not calls, "with gradients, bf16 CPU attention should not call the fused kernel"
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, fused, exact, strict=True):
        ours_err, fused_err = ((a - c).norm() / c.norm()).item(), ((b - c).norm() / c.norm()).item()
        assert ours_err <= 2 * fused_err + 1e-3, f"{name}: {ours_err:.4f} vs bf16 SDPA {fused_err:.4f}"
    with counting_sdpa() as calls, torch.no_grad():
        out = families._sdpa(*(x.bfloat16() for x in (q, k, v)), mask, 0.0)
    assert len(calls) == 1 and torch.allclose(out.float(), exact[0], rtol=0.05, atol=0.05)


def test_bf16_step_loss_within_2_percent_of_fp32(tiny_blip_dir, real_batch, eager):
    # On the LoRA model as built (random weights, loss near ln(vocab)).
    fp32, bf16 = eager["out"].loss.item(), eager["bf16"].loss.item()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in eager["bf16_grads"].values())
    assert abs(bf16 - fp32) <= 0.02 * fp32, f"bf16 loss {bf16:.4f} vs fp32 {fp32:.4f}"

    # A random model predicts a near-uniform distribution, where rounding hardly matters; fit the
    # batch for a few fp32 steps first so the check also runs where the loss has real structure.
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        _step(model, real_batch)
        optimizer.step()
    fp32, bf16 = _step(model, real_batch)[0].loss.item(), _step(model, real_batch, "bf16")[0].loss.item()
    assert fp32 < 8.0, f"the model should have moved off the uniform loss (~10.3), got {fp32:.3f}"
    assert abs(bf16 - fp32) <= 0.02 * fp32, f"bf16 loss {bf16:.4f} vs fp32 {fp32:.4f} after fitting"


def test_auto_precision_on_cpu_is_bf16_exactly_where_it_is_fast(monkeypatch):
    assert common.resolve_precision("auto", "cpu") == ("bf16" if common.cpu_bf16_is_faster() else "fp32")
    if not common.cpu_supports_bf16():
        assert not common.cpu_bf16_is_faster()  # no instructions, no probe
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(common, "cpu_bf16_is_faster", lambda fast=fast: fast)
        assert common.resolve_precision("auto", "cpu") == expected
