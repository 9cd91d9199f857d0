"""Hostile input, round 3: images whose shape explodes, settings whose product exhausts
memory, special files in every path setting, data that would be read silently wrong, and
inputs that used to end in a traceback. Each is one error (or a skipped image), read in
bounded memory, never a hang."""

import os
import unicodedata

import numpy as np
import pytest
from conftest import ROOT, assert_one_error, run_script, tiny_model_config
from PIL import Image

from data.dataset import run_splits
from data.folders import folder_split, label_names, list_split
from data.images import MAX_ASPECT, read_rgb
from models.build import build_model
from models.inference import _checked_contract
from utils.config import Node, load_config, path_override
from utils.errors import UserError
from utils.io.files import path_problem
from utils.io.tensor_io import save_tensors

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def _png(path, width=8, height=8, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def _data(root, **fields):
    base = load_config("configs/demo_folder.yaml", [path_override("data.path", str(root))]).data
    return Node(base, **fields)


# 3. Dimension bombs ------------------------------------------------------------------------

def test_an_image_whose_resize_would_explode_is_refused_from_its_header(tmp_path):
    wide = _png(tmp_path / "wide.png", width=MAX_ASPECT * 10 + 1, height=10)
    with pytest.raises(UserError, match=f"a ratio beyond {MAX_ASPECT}:1"):
        read_rgb(str(wide))
    tall = _png(tmp_path / "tall.png", width=1, height=3000)
    with pytest.raises(UserError, match="1 x 3000 pixels"):
        read_rgb(str(tall))
    assert read_rgb(str(_png(tmp_path / "ok.png", width=MAX_ASPECT * 10, height=10))).shape == \
        (10, MAX_ASPECT * 10, 3)


def test_a_crop_fraction_that_would_blow_up_the_resize_is_refused():
    with pytest.raises(UserError, match="'data.crop_fraction' must be >= 0.25"):
        load_config("configs/demo.yaml", ["data.crop_fraction=0.01"])
    contract = {"image_size": 1024, "crop_fraction": 0.01, "class_names": ["a", "b"]}
    with pytest.raises(UserError, match=r"crop_fraction in \[0.25, 1\]"):
        _checked_contract(contract, "preprocess.json")


# 4. Settings whose product exhausts memory -------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"embed_dim": 8192, "mlp_ratio": 64.0}, "GB of weights, gradients and optimizer state"),
    ({"patch_size": 1, "img_size": 1024}, "GB of attention per training image"),
    ({"depth": 128, "embed_dim": 8192, "num_heads": 8}, "more than this machine's"),
])
def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        build_model(tiny_model_config(kwargs=kwargs))


# 5. Special files in every path setting ----------------------------------------------------

@pytest.fixture
def specials(tmp_path):
    """A FIFO, /dev/zero, a folder and a symbolic-link loop."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {"a pipe": (str(fifo), "not a regular file"),
            "a device": ("/dev/zero", "not a regular file"),
            "a folder": (str(tmp_path), "is a folder"),
            "a loop": (str(loop), "symbolic link loop")}


def test_special_files_in_path_settings_are_one_line_each(tmp_path, specials):
    from models.build import load_weights

    model = build_model(tiny_model_config())
    for path, fragment in specials.values():
        for read in (lambda: label_names(_data(tmp_path, label_names=path), 3),
                     lambda: list_split(_data(tmp_path, name="list", train_list=path),
                                        "train_list", 3),
                     lambda: load_weights(model, path),
                     lambda: load_config(path)):
            with pytest.raises(UserError, match=fragment):
                read()


def test_a_special_file_given_to_the_entry_points_is_one_line(tmp_path, specials):
    fifo, _ = specials["a pipe"]
    proc = run_script("main.py", "-c", fifo, "--dry-run", timeout=60)
    assert_one_error(proc, "not a regular file")
    proc = run_script("val.py", "-c", "configs/demo.yaml", "--weights", "/dev/zero", timeout=60)
    assert_one_error(proc, "/dev/zero")


# 6. Silently wrong data --------------------------------------------------------------------

def test_a_repeated_yaml_key_is_an_error_not_a_silent_replacement(tmp_path):
    text = open(os.path.join(ROOT, "configs", "demo.yaml"), encoding="utf-8").read()
    config = tmp_path / "twice.yaml"
    config.write_text(text + "\ntrain:\n  seed: 3\n")
    with pytest.raises(UserError, match="the key 'train' appears twice"):
        load_config(str(config))
    config.write_text(text.replace("  seed: 0", "  seed: 0\n  seed: 1"))
    with pytest.raises(UserError, match="the key 'seed' appears twice"):
        load_config(str(config))


def test_paths_given_as_arguments_are_not_parsed_as_yaml(tmp_path):
    for path in ("run #2", "true", "1e3", "[a]", "a: b", "~"):
        cfg = load_config("configs/demo.yaml", [path_override("train.output_dir", path)])
        assert cfg.train.output_dir == path
    proc = run_script("main.py", "-c", "configs/demo.yaml", "--init-from",
                      str(tmp_path / "run #2" / "w.safetensors"), "--dry-run")
    assert proc.returncode == 0 and "run #2/w.safetensors" in proc.stdout, proc.stderr[-800:]


@pytest.mark.parametrize("bad", ["٣", "³", "３"])
def test_only_the_digits_0_to_9_are_labels_and_indices(tmp_path, bad):
    _png(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text(f"a.png {bad}\n", encoding="utf-8")
    with pytest.raises(UserError, match="a label of the digits 0-9"):
        list_split(_data(tmp_path, name="list", train_list="train.txt"), "train_list", 5)
    (tmp_path / "names.txt").write_text(f"0 cat\n{bad} dog\n", encoding="utf-8")
    with pytest.raises(UserError, match="an index of the digits 0-9"):
        label_names(_data(tmp_path, label_names="names.txt"), 2)
    with pytest.raises(UserError, match="is not an index"):
        load_config("configs/demo.yaml", [f"stages.{bad}.epochs=1"])


def test_list_paths_that_leave_the_data_folder_are_refused(tmp_path):
    root = tmp_path / "data"
    _png(tmp_path / "outside.png")
    _png(root / "inside.png")
    for name in ("../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png"):
        (root / "train.txt").write_text(f"{name} 0\n")
        with pytest.raises(UserError, match="lies outside data.path"):
            list_split(_data(root, name="list", train_list="train.txt"), "train_list", 2)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "train.txt").write_bytes("\ufeffa.png 1\n".encode("utf-8"))
    images, labels = list_split(_data(tmp_path, name="list", train_list="train.txt"),
                                "train_list", 2)
    assert list(labels) == [1]
    (tmp_path / "names.txt").write_bytes("\ufeff0 cat\n1 dog\n".encode("utf-8"))
    assert label_names(_data(tmp_path, label_names="names.txt"), 2) == ["cat", "dog"]


def test_repeated_class_names_name_the_real_problem(tmp_path):
    (tmp_path / "names.txt").write_text(f"0 {NFC}\n1 {NFD}\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives two classes one name.*Unicode normalisation"):
        label_names(_data(tmp_path, label_names="names.txt"), 2)
    (tmp_path / "names.txt").write_text("0 cat\n1 cat\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives two classes one name: 'cat' and 'cat'$"):
        label_names(_data(tmp_path, label_names="names.txt"), 2)
    (tmp_path / "names.txt").write_text("0 cat\n0 dog\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives index 0 a second name"):
        label_names(_data(tmp_path, label_names="names.txt"), 2)


def test_class_folders_are_one_class_whatever_their_unicode_form(tmp_path):
    for split, name in (("train", NFC), ("test", NFD)):
        _png(tmp_path / split / name / "1.png")
        _png(tmp_path / split / "dog" / "1.png")
    train = folder_split(_data(tmp_path), "train", [NFC, "dog"])
    test = folder_split(_data(tmp_path), "test", [NFC, "dog"])
    assert list(train[1]) == list(test[1]) == [0, 1]
    _png(tmp_path / "train" / NFD / "2.png")  # both forms in one split: ambiguous
    with pytest.raises(UserError, match="differ only in their Unicode normalisation"):
        run_splits(_data(tmp_path, val_split=0), 3, 0)


def test_a_class_folder_linked_to_another_is_refused(tmp_path):
    _png(tmp_path / "train" / "cat" / "1.png")
    _png(tmp_path / "test" / "cat" / "1.png")
    (tmp_path / "train" / "kitten").symlink_to(tmp_path / "train" / "cat")
    with pytest.raises(UserError, match="are the same folder .a symbolic link.: their images "
                                        "would be read under two labels"):
        run_splits(_data(tmp_path, val_split=0), 2, 0)


def test_float_and_32_bit_integer_images_are_refused_not_read_black(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match="32-bit floating-point pixels"):
        read_rgb(str(tmp_path / "float.tif"))
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(UserError, match="32-bit integer pixels from 0 to 1000000"):
        read_rgb(str(tmp_path / "int32.tif"))
    small = (ramp * 65535).astype(np.int32)  # 32-bit storage of 16-bit values: scaled
    Image.fromarray(small).save(tmp_path / "int16in32.tif")
    got = read_rgb(str(tmp_path / "int16in32.tif"))
    np.testing.assert_array_equal(got[..., 0], np.round(small * (255 / 65535)).astype(np.uint8))


# 9. What used to end in a traceback --------------------------------------------------------

def test_a_deep_override_and_a_nul_character_are_one_line(tmp_path):
    with pytest.raises(UserError, match="has 200 levels; configs have at most 32"):
        load_config("configs/demo.yaml", [".".join(["a"] * 200) + "=1"])
    with pytest.raises(UserError, match="'train.output_dir' holds a NUL character"):
        load_config("configs/demo.yaml", ['train.output_dir="out\\0put"'])
    assert path_problem("a\0b") == "holds a NUL character, which no file name can"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={loop}/x")
    assert_one_error(proc)


def test_class_names_a_terminal_cannot_show_are_escaped_not_a_traceback(tmp_path):
    import paddle

    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    names = ["猫", "犬", "鳥", "魚", "牛", "馬", "羊", "豚", "鶏", "兎"]
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict(),
                 {"class_names": names})
    image = _png(tmp_path / "x.png", width=16, height=16, value=128)
    proc = run_script("predict.py", "-c", "configs/demo.yaml", str(image), "--weights", weights,
                      env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\\u" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damaged", ["train: 5\n", "train: {ema: [1]}\n", "train: {ema: 3}\n"])
def test_val_kind_reads_a_damaged_run_config_without_a_traceback(tmp_path, damaged):
    from val import _kept_average

    (tmp_path / "config.yaml").write_text(damaged)
    assert _kept_average(str(tmp_path), "ema") is True  # then the weights decide


def test_an_image_replaced_by_a_folder_is_an_unreadable_image(tmp_path):
    image = _png(tmp_path / "x.png")
    os.remove(image)
    image.mkdir()
    with pytest.raises(UserError, match="is not a regular file"):
        read_rgb(str(image))
