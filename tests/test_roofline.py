"""Issue 12: the caption path and the benchmarks' roofline helpers, on a tiny random BLIP.

- inference.py accepts MIN_LENGTH == MAX_LENGTH (forcing an exact caption length is legitimate,
  and the caption benchmark needs it) and then every caption is exactly that many tokens.
- benchmarks/roofline.py counts attention on the CPU's fused SDPA kernel (torch's FlopCounterMode
  has no entry for it) and counts a linear layer as 2*M*N*K.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import families
import inference
from conftest import REPO, build_tiny_blip

sys.path.insert(0, str(REPO / "benchmarks"))
import roofline  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, blip_processor_dir):
    """An untrained LoRA of the tutorial's shape on the conftest tiny BLIP, with its processor."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_blip(tmp_path_factory.mktemp("base"), blip_processor_dir)
    family = families.load(str(base))
    torch.manual_seed(0)
    model = get_peft_model(
        family.load_model(str(base)),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(families.Blip.lora_targets)),
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    family.processor.save_pretrained(out)
    return out


def make_images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    return folder


@pytest.mark.parametrize("beams", [1, 2])
def test_equal_min_and_max_length_gives_captions_of_exactly_that_length(
    tmp_path, adapter_dir, monkeypatch, beams
):
    length = 9  # tokens, counting the start token, as MAX_LENGTH does
    seen = []
    generate_ids = inference.generate_ids

    def recording(*args, **kwargs):  # the token ids of every generate() that main() runs
        ids = generate_ids(*args, **kwargs)
        seen.extend(i for i in ids if i is not None)
        return ids

    monkeypatch.setattr(inference, "generate_ids", recording)
    out = inference.main(
        [
            f"--ADAPTER_DIR={adapter_dir}",
            f"--IMAGES={make_images(tmp_path / 'images')}",
            f"--MIN_LENGTH={length}",
            f"--MAX_LENGTH={length}",
            f"--NUM_BEAMS={beams}",
            "--PRECISION=fp32",
            "--REFERENCES=None",
            "--SHOW=never",
            "--BATCH_SIZE=2",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
        ]
    )
    assert len(out["images"]) == 3 and all(r["fine_tuned"] and r["base"] for r in out["images"])
    assert out["generate"]["min_new_tokens"] == out["generate"]["max_new_tokens"] == length - 1
    text = families.load(inference.read_model_dir(adapter_dir)["base"]).config.text_config
    assert len(seen) == 4  # 2 batches x (fine-tuned, base)
    for ids in seen:
        assert ids.shape[1] == length  # [DEC] + 8 tokens, none cut short, none longer
        assert not (ids[:, 1:] == text.sep_token_id).any() and not (ids[:, 1:] == text.pad_token_id).any()


def test_max_length_below_min_length_is_still_an_error(tmp_path, adapter_dir):
    with pytest.raises(inference.UserError, match="MAX_LENGTH >= MIN_LENGTH"):
        inference.main(
            [
                f"--ADAPTER_DIR={adapter_dir}",
                f"--IMAGES={make_images(tmp_path / 'images', 1)}",
                "--MIN_LENGTH=9",
                "--MAX_LENGTH=8",
                "--REFERENCES=None",
                "--SHOW=never",
            ]
        )


# ----------------------------------------------------------------------------- roofline helpers
def test_flop_count_of_a_linear_is_2mnk_and_cpu_sdpa_is_counted():
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    with roofline.FlopCount() as count:
        torch.nn.functional.linear(x, w)
    assert count.total == 2 * 5 * 3 * 7
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    with roofline.FlopCount() as count:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # q @ k^T and p @ v: 2 x (2*4 heads) x (2 * 6 * 10 * 8)
    assert count.total == 2 * 2 * 4 * (2 * 6 * 10 * 8)
    with roofline.FlopCount() as count:
        out.sum().backward()
    assert count.total > 0  # the backward kernel is counted too


def test_share_of_the_ceiling():
    fig = roofline.share(150e9, 2.0, {"precision": "fp32", "gflops": 400.0})
    assert fig["achieved_gflops"] == 300.0 and fig["percent_of_ceiling"] == 75.0
    c = roofline.matmul_ceiling("fp32", shapes=[(64, 32, 48)], repeats=2)
    assert c["gflops"] > 0 and c["precision"] == "fp32" and list(c["per_shape_gflops"]) == ["64x32x48"]


def test_time_breakdown_groups_profiled_ops_by_kind():
    x = torch.randn(768, 768)  # a few ms of matmul: its time is rounded to 0.1 ms
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        y = x @ x
        y.softmax(-1)
        y.to(torch.bfloat16)
        torch.nn.functional.gelu(y)
    fig = roofline.time_breakdown(profile, flops=2 * 768**3)
    assert {"matmul", "softmax", "casts and copies", "norms and activations"} <= fig["by_kind"].keys()
    assert sum(k["share"] for k in fig["by_kind"].values()) == pytest.approx(1, abs=0.01)
    matmul_ms = fig["by_kind"]["matmul"]["ms"]
    assert fig["matmul_and_attention_kernels_gflops"] == pytest.approx(2 * 768**3 / matmul_ms / 1e6, rel=0.1)
    assert "matmul" in roofline.describe_breakdown(fig)


def test_train_step_figures_count_and_profile_train_blips_own_step(tiny_blip_dir, train_data, tmp_path):
    fig = roofline.train_step_flops(str(tiny_blip_dir), str(train_data), ["--PRECISION=fp32"], str(tmp_path))
    assert (
        fig["precision"] == "fp32" and fig["prefix_stages_cached"] > 0
    )  # the tutorial's LoRA starts at layer 6
    assert fig["flops_per_sample"] > 0 and fig["by_op_gflop"]
    assert fig["time_breakdown"]["by_kind"]["matmul"]["ms"] > 0
    assert list(tmp_path.iterdir()) == []  # its scratch output folder is gone
