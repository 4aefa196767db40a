"""Tests for inference.py on a tiny random BLIP with the real processor.

The adapters are made here with peft (the tutorial's LoRA config, a few optimizer steps so they
are not zero), never by train_blip.py, except in the slow end-to-end test at the bottom.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import families
import inference
from common import UserError
from conftest import REPO, build_tiny_blip

TUTORIAL_TARGETS = list(families.Blip.lora_targets)
TEXT_TARGETS = [t for t in TUTORIAL_TARGETS if t.startswith("text_decoder")]
GREEDY = dict(num_beams=1, max_length=16, min_length=5)
BEAMS = dict(num_beams=3, max_length=16, min_length=5)
FAST = ["--PRECISION=fp32", "--MAX_LENGTH=16", "--NUM_BEAMS=1", "--REFERENCES=None"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ----------------------------------------------------------------------------- fixtures
def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Blocky random pictures of assorted sizes: distinct enough that captions differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        blocks = rng.integers(0, 256, size=(4 + i % 3, 5, 3), dtype=np.uint8)
        im = Image.fromarray(blocks).resize((90 + 7 * i, 70 + 5 * i), Image.NEAREST)
        paths.append(folder / f"img{i}.jpg")
        im.save(paths[-1], quality=95)
    return paths


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, blip_processor_dir) -> Path:
    """The conftest tiny BLIP with livelier vision and cross-attention weights: at the default
    init (std 0.02) a tiny random BLIP writes nearly the same caption for every image, which would
    make 'batched == one by one' pass for the wrong reason."""
    folder = build_tiny_blip(tmp_path_factory.mktemp("base"), blip_processor_dir)
    model = families.load(str(folder)).load_model(str(folder))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (
                "vision" in name or "crossattention" in name
            ):
                module.weight.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"), 5)


def train_adapter(base: Path, out: Path, targets, image_paths, steps=4, lr=1e-2, save_processor=True) -> Path:
    """LoRA r16/alpha32/dropout 0.05 as in the tutorial, a few AdamW steps on style captions."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    family = families.load(str(base))
    processor = family.processor
    model = get_peft_model(
        family.load_model(str(base)),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets),
    )
    pics = [common.open_image(p) for p in image_paths]
    batch = processor(
        images=pics, text=["a picture thwisss iz funny."] * len(pics), return_tensors="pt", padding=True
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=batch.pixel_values, input_ids=batch.input_ids, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    if save_processor:
        processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir, images) -> Path:
    return train_adapter(base_dir, tmp_path_factory.mktemp("adapter"), TUTORIAL_TARGETS, images[:3])


@pytest.fixture(scope="module")
def loaded(adapter_dir):
    model, family, info = inference.load_captioner(adapter_dir)
    return model, family


@pytest.fixture(scope="module")
def pics(images):
    return [common.open_image(p) for p in images]


def run(tmp_path, *args):
    """main() with outputs in tmp_path and fast decoding; returns the results dict."""
    return inference.main(
        [
            f"--RESULTS_PATH={tmp_path / 'results.json'}",
            f"--FIGURE_PATH={tmp_path / 'figure.png'}",
            "--SHOW=never",
            *FAST,
            *args,
        ]
    )


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("settings", [GREEDY, BEAMS], ids=["greedy", "beam3"])
def test_decoding_is_deterministic_and_batching_changes_nothing(loaded, pics, settings):
    model, family = loaded
    batched = inference.caption_images(model, family, pics, batch_size=4, **settings)
    assert batched == inference.caption_images(model, family, pics, batch_size=4, **settings)
    one_by_one = [inference.caption_images(model, family, [p], batch_size=1, **settings)[0] for p in pics]
    assert batched == one_by_one
    assert len(set(batched)) > 1, "captions should depend on the image, or this test proves nothing"


@pytest.mark.parametrize("free_gb, sizes", [(64, [8, 12]), (0.001, [8, 8, 4])], ids=["room", "tight"])
def test_auto_batch_size_grows_to_what_free_memory_holds(tmp_path, adapter_dir, monkeypatch, free_gb, sizes):
    """BATCH_SIZE="auto": the first batch of 8 is measured, then the rest go in batches of what half
    the free memory holds (here capped by the images left, or kept at 8); captions as with one batch."""
    folder = tmp_path / "pics"
    make_images(folder, 20)
    seen = []
    real = inference.caption_both

    def spy(model, base_model, family, images, *rest):
        seen.append(len(images))
        return real(model, base_model, family, images, *rest)

    monkeypatch.setattr(inference, "caption_both", spy)
    monkeypatch.setattr(common, "memory_growth", lambda fn, device: (fn(), 100 << 20, int(free_gb * 2**30)))
    auto = run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={folder}", "--COMPARE_BASE=False")
    assert seen == sizes
    seen.clear()
    one = run(
        tmp_path,
        f"--ADAPTER_DIR={adapter_dir}",
        f"--IMAGES={folder}",
        "--COMPARE_BASE=False",
        "--BATCH_SIZE=20",
    )
    assert seen == [20]
    assert [r["fine_tuned"] for r in auto["images"]] == [r["fine_tuned"] for r in one["images"]]


def test_memory_growth_sees_what_a_call_allocates():
    def allocate():
        block = torch.ones(256, (1 << 20) // 4)  # 256 MB, every page written
        time.sleep(0.05)  # the sampler runs every 10 ms
        return float(block[-1, -1])

    result, grown, free = common.memory_growth(allocate)
    assert result == 1.0 and grown >= 200 << 20 and free > 0


def test_shared_vision_forward_equals_blip_generate(loaded, pics):
    """Our path (vision prefix once, then the rest with the adapter on and off) gives exactly the
    token ids of BlipForConditionalGeneration.generate in each adapter state."""
    model, family = loaded
    pixels = family.pixel_values(pics[:3])
    tuned, base = inference.generate_ids(model, family, pixels, compare_base=True, **BEAMS)
    with torch.inference_mode():
        assert torch.equal(tuned, model.get_base_model().generate(pixel_values=pixels, **BEAMS))
        with model.disable_adapter():
            assert torch.equal(base, model.get_base_model().generate(pixel_values=pixels, **BEAMS))


def test_first_adapted_stage(tmp_path, base_dir, images, adapter_dir):
    text_only = train_adapter(base_dir, tmp_path / "text", TEXT_TARGETS, images[:2], steps=1)
    everything = train_adapter(base_dir, tmp_path / "all", "all-linear", images[:2], steps=1)

    def first(folder):
        model, family, _ = inference.load_captioner(folder)
        return inference.first_adapted_stage(family.vision_stages(model.get_base_model()))

    assert first(adapter_dir) == 7  # tutorial: embeddings + layers 0-5 shared, layer 6 adapted
    assert first(text_only) == 12  # embeddings, all 10 layers and the final norm shared
    assert first(everything) == 1  # all-linear: only the (convolutional) patch embeddings are shared


def test_base_toggle_really_switches(loaded, pics, base_dir):
    model, family = loaded
    tuned, base = inference.caption_images_with_base(model, family, pics, **GREEDY)
    assert tuned != base  # the adapter changed something after a few steps
    plain = family.load_model(str(base_dir)).eval()
    assert base == inference.caption_images(plain, family, pics, **GREEDY)
    assert tuned == inference.caption_images(model, family, pics, **GREEDY)  # toggle restored


def test_compare_base_runs_the_shared_vision_layers_once(loaded, pics):
    """The README's claim: under COMPARE_BASE the vision layers the adapter leaves alone run once per
    batch for both captions; the adapted ones (tutorial: layers 6-9 and after) run once per pass."""
    model, family = loaded
    vision = model.get_base_model().vision_model
    calls = {"embeddings": 0, "layer 5": 0, "layer 6": 0}
    hooks = [
        module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        for key, module in (
            ("embeddings", vision.embeddings),
            ("layer 5", vision.encoder.layers[5]),
            ("layer 6", vision.encoder.layers[6]),
        )
    ]
    try:
        inference.caption_images_with_base(model, family, pics[:4], batch_size=4, **GREEDY)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"embeddings": 1, "layer 5": 1, "layer 6": 2}


def test_sampling_follows_seed_and_differs_from_greedy(tmp_path, adapter_dir, images):
    """The tiny random decoder's next-token distribution is flat, so sampling really samples: the
    same SEED repeats its captions, another SEED gives others, and neither is the greedy caption."""
    args = [f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={images[0].parent}", "--COMPARE_BASE=False"]

    def captions(*extra):
        return [r["fine_tuned"] for r in run(tmp_path, *args, *extra)["images"]]

    sampled = captions("--DO_SAMPLE=True", "--SEED=3", "--TEMPERATURE=1.0", "--TOP_P=1.0")
    assert sampled == captions("--DO_SAMPLE=True", "--SEED=3", "--TEMPERATURE=1.0", "--TOP_P=1.0")
    assert sampled != captions("--DO_SAMPLE=True", "--SEED=4", "--TEMPERATURE=1.0", "--TOP_P=1.0")
    assert sampled != captions("--DO_SAMPLE=False")


def test_bf16_runs_on_cpu_and_matches_fp32(loaded, pics, tmp_path, adapter_dir, images):
    """PRECISION='bf16' forced, whatever the CPU probe would pick: the script runs in bf16, and the
    model's next-token distribution stays within bf16 rounding of fp32."""
    out = inference.main(
        [
            f"--ADAPTER_DIR={adapter_dir}",
            f"--IMAGES={images[0]}",
            "--SHOW=never",
            "--REFERENCES=None",
            "--MAX_LENGTH=12",
            "--PRECISION=bf16",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
        ]
    )
    assert out["model"]["dtype"] == "bfloat16" and out["images"][0]["fine_tuned"]

    model, family = inference.load_captioner(adapter_dir)[:2]
    pixels = family.pixel_values(pics[:2])
    start = torch.full((2, 1), model.config.text_config.bos_token_id)

    def next_token_probs():
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            logits = model(pixel_values=pixels.to(dtype), input_ids=start).logits
        return logits[:, -1].float().softmax(-1)

    fp32 = next_token_probs()
    assert inference.set_precision(model, "bf16") == torch.bfloat16
    bf16 = next_token_probs()
    assert (bf16 - fp32).abs().sum(-1).max() < 0.05  # total variation distance of the two distributions


# ----------------------------------------------------------------------------- metrics
def test_metrics_known_values():
    refs = {"a": ["A cat sitting on a red mat."], "b": ["Two dogs play in the green park."]}
    same = {"a": "a cat sitting on a red mat", "b": "two dogs play in the green park"}
    disjoint = {"a": "zebra xylophone quantum violin", "b": "umbrella orbit lantern moss"}
    scores = inference.score_caption_sets({"same": same, "disjoint": disjoint}, refs)
    assert scores["same"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["same"]["ROUGE-L"] == pytest.approx(1.0)
    assert scores["disjoint"]["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert scores["disjoint"]["CIDEr"] == pytest.approx(0.0)
    if inference.java_available():
        assert scores["tokenizer"] == "PTB (Java)"
        assert scores["same"]["METEOR"] == pytest.approx(1.0, abs=1e-3)


def test_metrics_without_java_fall_back_and_skip_meteor(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    scores = inference.score_caption_sets({"c": {"a": "A dog, running!"}}, {"a": ["a dog running"]})
    assert scores["tokenizer"] == "plain (no Java)"
    assert scores["c"]["METEOR"] is None and scores["c"]["BLEU-1"] == pytest.approx(1.0)
    assert capsys.readouterr().out.count("Java not found") == 1
    assert inference.plain_tokenize("A man's dog, on  the 'grass'.") == "a man's dog on the grass"


def test_style_rates_and_table():
    caps = ["a dog on thwisss grass. thwisss iz funny.", "a cat iz here", "a bird"]
    assert inference.style_rates(caps) == pytest.approx({"suffix": 1 / 3, "thwisss": 1 / 3, "iz": 2 / 3})
    rows = inference.before_after_table(
        None, {"fine_tuned": inference.style_rates(caps), "base": inference.style_rates(["x"])}
    )
    text = inference.format_table(rows)
    assert '"thwisss iz funny"' in text and "33.3%" in text and "+33.3" in text


# ----------------------------------------------------------------------------- main: outputs
def test_main_writes_results_figure_and_table(tmp_path, adapter_dir, images, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)  # no Java here: fast, and the fallback in main
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    (folder / "references.json").write_text(
        json.dumps({"img0.jpg": ["a picture thwisss iz funny."], "img1.jpg": ["a red box"]})
    )
    args = [a for a in FAST if not a.startswith("--REFERENCES")]
    out = inference.main(
        [
            f"--ADAPTER_DIR={adapter_dir}",
            f"--IMAGES={folder}",
            f"--RESULTS_PATH={tmp_path / 'r.json'}",
            f"--FIGURE_PATH={tmp_path / 'f.png'}",
            "--SHOW=never",
            *args,
        ]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["file"] for r in saved["images"]] == [p.name for p in images]
    assert all(r["fine_tuned"] and r["base"] for r in saved["images"])
    assert saved["metrics"]["images_scored"] == 2 and saved["metrics"]["tokenizer"] == "plain (no Java)"
    assert saved["metrics"]["fine_tuned"]["METEOR"] is None
    assert {r["metric"] for r in saved["table"]} >= {"BLEU-4", "CIDEr", 'style "thwisss iz funny"'}
    assert set(saved["style"]) == {"fine_tuned", "base"} and saved["table_text"] == out["table_text"]
    assert saved["figure"]["panels"] == len(images)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_has_one_panel_per_image_and_single_image_title(pics):
    fig = inference.draw_figure(pics[:3], ["a", "b", "c"], ["one", "two", "three"], ["x", "y", "z"])
    assert len(fig.axes) == 3
    single = inference.draw_figure(pics[:1], ["a"], ["a long caption " * 8])
    assert len(single.axes) == 1 and single.axes[0].get_title().startswith("a long caption")
    assert "\n" in single.axes[0].get_title()  # wrapped


def test_show_auto_is_headless_safe(tmp_path, adapter_dir, images, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not inference.has_display() or sys.platform in ("darwin", "win32")
    for show in ("auto", "always"):  # 'always' on a headless Agg backend must not crash either
        out = inference.main(
            [
                f"--ADAPTER_DIR={adapter_dir}",
                f"--IMAGES={images[0]}",
                f"--SHOW={show}",
                *FAST,
                f"--RESULTS_PATH={tmp_path / 'r.json'}",
                f"--FIGURE_PATH={tmp_path / show / 'f.png'}",
            ]
        )
        assert (tmp_path / show / "f.png").is_file() and out["figure"]["panels"] == 1
    with pytest.raises(UserError, match="SHOW"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={images[0]}", "--SHOW=sometimes")


def test_merge_to_gives_the_same_captions(tmp_path, adapter_dir, images):
    out = run(
        tmp_path,
        f"--ADAPTER_DIR={adapter_dir}",
        f"--IMAGES={images[0].parent}",
        f"--MERGE_TO={tmp_path / 'merged'}",
    )
    from transformers import BlipForConditionalGeneration, BlipProcessor

    merged = BlipForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    family = families.Blip(merged.config, BlipProcessor.from_pretrained(tmp_path / "merged"))
    captions = inference.caption_images(
        merged, family, [common.open_image(p) for p in images], num_beams=1, max_length=16, min_length=5
    )
    assert captions == [r["fine_tuned"] for r in out["images"]]
    assert out["merged_to"] == str(tmp_path / "merged")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="MERGE_TO.*not a model folder"):
        run(
            tmp_path,
            f"--ADAPTER_DIR={adapter_dir}",
            f"--IMAGES={images[0]}",
            f"--MERGE_TO={tmp_path / 'not_a_model'}",
        )


# ----------------------------------------------------------------------------- loading
def test_tutorial_saved_adapter_names_an_unreachable_base(tmp_path, adapter_dir, base_dir, images):
    """The tutorial's own save: base Salesforce/blip-image-captioning-base, r16, its targets, no
    processor files, old-style adapter_model.bin."""
    tut = tmp_path / "tutorial_adapter"
    tut.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Salesforce/blip-image-captioning-base"
    (tut / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    torch.save(load_file(adapter_dir / "adapter_model.safetensors"), tut / "adapter_model.bin")
    with pytest.raises(UserError, match=r"Salesforce/blip-image-captioning-base.*BASE_MODEL_ID"):
        run(tmp_path, f"--ADAPTER_DIR={tut}", f"--IMAGES={images[0]}")
    out = run(tmp_path, f"--ADAPTER_DIR={tut}", f"--BASE_MODEL_ID={base_dir}", f"--IMAGES={images[0]}")
    same = run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={images[0]}")
    assert out["images"][0]["fine_tuned"] == same["images"][0]["fine_tuned"]


def test_adapter_that_does_not_fit_its_base(tmp_path, adapter_dir, blip_processor_dir, images):
    other = build_tiny_blip(tmp_path / "other", blip_processor_dir, hidden=32)
    with pytest.raises(UserError, match=r"does not fit the base .*BASE_MODEL_ID"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--BASE_MODEL_ID={other}", f"--IMAGES={images[0]}")


def test_full_model_folder(tmp_path, base_dir, images, capsys):
    """train_blip.py with USE_LORA=False saves a whole model: it captions; the base comparison
    needs BASE_MODEL_ID (a second model, as nothing can be switched off)."""
    full = tmp_path / "full"
    shutil.copytree(base_dir, full)
    out = run(tmp_path, f"--ADAPTER_DIR={full}", f"--IMAGES={images[0]}")
    assert "base" not in out["images"][0] and "set --BASE_MODEL_ID" in capsys.readouterr().out
    out = run(tmp_path, f"--ADAPTER_DIR={full}", f"--IMAGES={images[0]}", f"--BASE_MODEL_ID={base_dir}")
    assert out["images"][0]["base"] == out["images"][0]["fine_tuned"]  # same weights here
    with pytest.raises(UserError, match="MERGE_TO needs a LoRA adapter"):
        run(tmp_path, f"--ADAPTER_DIR={full}", f"--IMAGES={images[0]}", f"--MERGE_TO={tmp_path / 'm'}")


# ----------------------------------------------------------------------------- bad input
def test_missing_or_empty_adapter_dir(tmp_path, images):
    with pytest.raises(UserError, match=r"nope.*run train_blip.py first"):
        run(tmp_path, f"--ADAPTER_DIR={tmp_path / 'nope'}", f"--IMAGES={images[0]}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*run train_blip.py first"):
        run(tmp_path, f"--ADAPTER_DIR={tmp_path / 'empty'}", f"--IMAGES={images[0]}")


def test_script_prints_one_line_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), f"--ADAPTER_DIR={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: ADAPTER_DIR={str(tmp_path / 'none')!r} does not exist: run train_blip.py first "
        f"(it saves there), or point --ADAPTER_DIR at its OUTPUT_DIR"
    ]


def test_no_images_is_an_error(tmp_path, adapter_dir):
    with pytest.raises(UserError, match="no such file"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={tmp_path / 'missing.jpg'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={tmp_path / 'empty'}")
    with pytest.raises(UserError, match="no image files"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={tmp_path / 'empty' / '*.png'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 file"):
        run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={tmp_path / 'bad'}")


def test_bad_references_file(tmp_path, adapter_dir, images):
    (tmp_path / "refs.json").write_text("{not json")
    with pytest.raises(UserError, match="REFERENCES"):
        inference.main(
            [
                f"--ADAPTER_DIR={adapter_dir}",
                f"--IMAGES={images[0]}",
                f"--REFERENCES={tmp_path / 'refs.json'}",
            ]
        )
    (tmp_path / "refs.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="REFERENCES"):
        inference.main(
            [
                f"--ADAPTER_DIR={adapter_dir}",
                f"--IMAGES={images[0]}",
                f"--REFERENCES={tmp_path / 'refs.json'}",
            ]
        )


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's signature
    without the bytes (Pillow must refuse it from the header alone)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def make_nasty_corpus(folder: Path) -> dict[str, str]:
    """Issue 6's nasty images -> 'skip' or 'caption'."""
    folder.mkdir(parents=True)
    red = Image.new("RGB", (80, 40), (220, 20, 20))
    (folder / "zero.jpg").write_bytes(b"")
    red.save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])
    (folder / "whole.jpg").unlink()
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_claiming_size(50_000, 50_000))
    (folder / "missing.jpg").symlink_to(folder / "gone.jpg")  # a dangling link: listed, then missing
    red.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = Image.new("RGBA", (40, 40), (20, 200, 20, 255))
    rgba.paste((0, 0, 0, 0), (20, 0, 40, 40))  # right half transparent
    rgba.save(folder / "rgba.png")
    Image.new("RGB", (40, 40), (20, 20, 220)).convert("P").save(folder / "palette.png")
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the stored left half shows on top
    rotated = Image.new("RGB", (80, 40), (20, 20, 220))
    rotated.paste((220, 20, 20), (0, 0, 40, 40))
    rotated.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (200, 200, 0)).save(folder / "tiny1x1.png")
    Image.new("L", (10_000, 10_000), 90).save(folder / "huge10k.png", compress_level=1)
    Image.new("L", (40, 40), 128).save(folder / "gray.jpg")
    return {
        "zero.jpg": "skip",
        "truncated.jpg": "skip",
        "text.jpg": "skip",
        "bomb.png": "skip",
        "missing.jpg": "skip",
        "cmyk.jpg": "caption",
        "rgba.png": "caption",
        "palette.png": "caption",
        "gray16.png": "caption",
        "exif_rotated.jpg": "caption",
        "tiny1x1.png": "caption",
        "huge10k.png": "caption",
        "gray.jpg": "caption",
    }


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nasty") / "corpus"
    return folder, make_nasty_corpus(folder)


def test_nasty_inputs_are_skipped_by_name_and_the_rest_captioned(tmp_path, adapter_dir, nasty):
    folder, expect = nasty
    out = run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={folder}", "--BATCH_SIZE=4")
    skipped = {Path(s["file"]).name: s["reason"] for s in out["skipped"]}
    assert set(skipped) == {k for k, v in expect.items() if v == "skip"}
    assert all(name in reason for name, reason in skipped.items())  # every message names its file
    assert "too large" in skipped["bomb.png"]
    assert {r["file"] for r in out["images"]} == {k for k, v in expect.items() if v == "caption"}
    assert all(r["fine_tuned"] for r in out["images"])


def test_the_model_sees_the_right_pixels(nasty, loaded):
    """Through inference's own reader and preprocessing: orientation, colour modes, 16-bit."""
    folder, _ = nasty
    _, family = loaded
    processor = family.processor
    names = ["exif_rotated.jpg", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png", "gray.jpg"]
    skipped = []
    batches = list(inference.read_batches([folder / n for n in names], inference.BatchSize(8), skipped))
    assert not skipped
    pixels = family.pixel_values([im for _, im in batches[0]])
    ip = processor.image_processor
    rgb = pixels * torch.tensor(ip.image_std).view(1, 3, 1, 1) + torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    half = rgb.shape[-1] // 2

    def mean(i, rows=slice(None), cols=slice(None)):
        return rgb[i, :, rows, cols].mean(dim=(1, 2)).tolist()

    top, bottom = mean(0, slice(0, half - 4)), mean(0, slice(half + 4, None))
    assert top[0] > 0.7 > top[2] and bottom[2] > 0.7 > bottom[0]  # red above blue: EXIF applied
    assert mean(1)[0] > 0.7 > max(mean(1)[1:])  # CMYK red stays red
    assert min(mean(2, cols=slice(half + 4, None))) > 0.95  # transparent -> white, not black
    assert mean(2, cols=slice(0, half - 4))[1] > 0.7  # opaque green stays green
    assert mean(3)[2] > 0.7 > mean(3)[0]  # palette blue
    assert mean(4) == pytest.approx([0.5] * 3, abs=0.02)  # 16-bit mid-grey, not clipped to white
    assert mean(5) == pytest.approx([128 / 255] * 3, abs=0.02)  # grayscale


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_download_train_infer(tmp_path, serve, coco_mirror, blip_processor_dir):
    """download_coco.py (served mirror) -> train_blip.py (tiny BLIP, all-linear LoRA at a high lr,
    which a random tiny model needs) -> inference.py on the held-out samples/."""
    download_coco = pytest.importorskip("download_coco")
    train_blip = pytest.importorskip("train_blip")
    server = serve(coco_mirror)
    download_coco.main(
        [
            f"--COCO_BASE_URL={server.url}",
            f"--OUTPUT_DIR={tmp_path / 'coco_sample'}",
            f"--SAMPLES_DIR={tmp_path / 'samples'}",
            f"--ANNOTATIONS_DIR={tmp_path / 'annotations'}",
            "--NUM_IMAGES=40",
            "--NUM_TEST_IMAGES=10",
        ]
    )
    tiny = build_tiny_blip(tmp_path / "tiny", blip_processor_dir)
    train_blip.main(
        [
            f"--MODEL_ID={tiny}",
            f"--DATA_DIR={tmp_path / 'coco_sample'}",
            f"--OUTPUT_DIR={tmp_path / 'adapter'}",
            "--LORA_TARGET_MODULES=all-linear",
            "--LR=2e-3",
            "--EPOCHS=5",
            "--VAL_FRACTION=0",
            "--NUM_SAMPLE_CAPTIONS=0",
            "--NUM_WORKERS=0",
            "--NUM_THREADS=1",
            "--RESUME=None",
        ]
    )
    out = inference.main(
        [
            f"--ADAPTER_DIR={tmp_path / 'adapter'}",
            f"--IMAGES={tmp_path / 'samples'}",
            "--SHOW=never",
            f"--RESULTS_PATH={tmp_path / 'results.json'}",
            f"--FIGURE_PATH={tmp_path / 'figure.png'}",
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    held_out = set(json.loads((tmp_path / "samples" / "references.json").read_text()))
    assert held_out.isdisjoint(json.loads((tmp_path / "coco_sample" / "captions.json").read_text()))
    assert {r["file"] for r in saved["images"]} >= held_out and not saved["skipped"]
    assert saved["style"]["base"]["suffix"] <= 0.05
    assert saved["style"]["fine_tuned"]["suffix"] >= 0.95
    assert "test_image.jpg" in held_out  # a copy of one held-out image, listed so the default run is scored
    assert saved["metrics"]["images_scored"] == len(held_out) - 1  # ... but each image is scored once
    assert saved["figure"]["panels"] == len(saved["images"]) and out["table_text"] == saved["table_text"]


def test_batch_size_may_be_edited_into_the_file_as_a_number(tmp_path, adapter_dir, images, monkeypatch):
    """Users edit the constants: BATCH_SIZE = 2 in the file is an int, --BATCH_SIZE=2 arrives as "2"."""
    monkeypatch.setattr(inference, "BATCH_SIZE", 2)
    sizes = []
    real = inference.caption_both
    monkeypatch.setattr(
        inference, "caption_both", lambda m, b, f, ims, *r: sizes.append(len(ims)) or real(m, b, f, ims, *r)
    )
    run(tmp_path, f"--ADAPTER_DIR={adapter_dir}", f"--IMAGES={images[0].parent}", "--COMPARE_BASE=False")
    assert sizes and max(sizes) == 2
