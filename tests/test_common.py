"""Unit tests of the shared helpers: the configurator, atomic writes, image opening."""

import subprocess
import sys
import textwrap

import pytest
from PIL import Image

import common
from common import UserError

CONSTANTS = dict(EPOCHS=60, LR=3e-5, NAME="coco", RESUME="auto", TARGETS=["a", "b"], FLAG=True, OPTIONAL=None)


def test_configure_applies_typed_overrides_without_touching_defaults():
    g = dict(CONSTANTS, helper=lambda: 0, lower_case=1)
    cfg = common.configure(g, ["--EPOCHS=3", "--LR=1", "--NAME=val2017", "--FLAG=False", "--OPTIONAL=[1, 2]"])
    assert cfg == dict(CONSTANTS, EPOCHS=3, LR=1.0, NAME="val2017", FLAG=False, OPTIONAL=[1, 2])
    assert isinstance(cfg["LR"], float)  # an int is accepted where a float is expected
    assert g["EPOCHS"] == 60  # the module's own constants are never modified


def test_configure_lists_and_none():
    # RESUME documents None (start fresh) although its default is a string: the script says so in _NONE_OK
    cfg = common.configure(dict(CONSTANTS, _NONE_OK=("RESUME",)), ["--TARGETS=x,y", "--RESUME=None"])
    assert cfg["TARGETS"] == ["x", "y"] and cfg["RESUME"] is None
    assert common.configure(CONSTANTS, ["--TARGETS=all-linear"])["TARGETS"] == ["all-linear"]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--EPOCS=3", "unknown setting --EPOCS; valid names: EPOCHS"),
        ("--EPOCHS=three", "expected int"),
        ("--FLAG=1", "expected bool"),
        ("EPOCHS=3", "use --NAME=value"),
    ],
)
def test_configure_rejects_bad_overrides(arg, message):
    with pytest.raises(UserError, match=message):
        common.configure(CONSTANTS, [arg])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(common.__file__.rsplit("/", 1)[0])!r})
        import common
        EPOCHS = 1
        def main(argv=None):
            common.configure(globals(), argv)
        common.cli(main)()
    """)
    )
    r = subprocess.run([sys.executable, str(script), "--NOPE=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown setting --NOPE; valid names: EPOCHS"]


def test_atomic_write_json_leaves_no_temp_files(tmp_path):
    common.atomic_write_json(tmp_path / "out" / "x.json", {"a": "é"})
    assert (tmp_path / "out" / "x.json").read_text(encoding="utf-8").strip() == '{\n  "a": "é"\n}'
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.json"]


def test_check_writable(tmp_path):
    assert common.check_writable(tmp_path / "new", "OUTPUT_DIR").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write to .*file.*change OUTPUT_DIR"):
        common.check_writable(tmp_path / "file" / "sub", "OUTPUT_DIR")


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16", "1"])
def test_open_image_gives_rgb_for_every_mode(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    im = (
        Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (8, 6), 65535)
    )
    im.save(path)
    out = common.open_image(path)
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # 16-bit white is scaled, not clipped to garbage


def test_open_image_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise when shown
    im.save(tmp_path / "r.jpg", exif=exif)
    assert common.open_image(tmp_path / "r.jpg").size == (20, 40)


def test_open_image_rgba_composites_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert common.open_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_open_image_errors_name_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    for name in ("empty.jpg", "text.jpg", "cut.jpg", "missing.jpg"):
        with pytest.raises(UserError, match=name):
            common.open_image(tmp_path / name)


def test_open_image_refuses_decompression_bombs_without_decoding(tmp_path, monkeypatch):
    Image.new("L", (3000, 2000)).save(tmp_path / "big.png")
    monkeypatch.setattr(common, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(UserError, match="too large"):
        common.open_image(tmp_path / "big.png")


def test_resolve_precision():
    assert common.resolve_precision("fp32", "cpu") == "fp32"
    assert common.resolve_precision("auto", "cpu") == ("bf16" if common.cpu_bf16_is_faster() else "fp32")
    with pytest.raises(UserError, match="valid values"):
        common.resolve_precision("half", "cpu")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        common.resolve_precision("fp16", "cpu")


def test_open_image_reduces_huge_images_keeping_aspect_and_orientation(tmp_path):
    im = Image.new("RGB", (6000, 3000), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 3000 x 6000
    im.save(tmp_path / "huge.jpg", exif=exif, quality=50)
    Image.new("L", (5000, 1000), 128).save(tmp_path / "huge.png")
    assert common.open_image(tmp_path / "huge.jpg").size == (
        common.MAX_DECODE_SIDE // 2,
        common.MAX_DECODE_SIDE,
    )
    out = common.open_image(tmp_path / "huge.png")
    assert (
        out.size == (common.MAX_DECODE_SIDE, round(common.MAX_DECODE_SIDE / 5))
        and out.getpixel((0, 0)) == (128,) * 3
    )
