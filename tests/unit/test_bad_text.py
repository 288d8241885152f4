"""Text the user hands the engine (--cfg, index CSVs, exclusion lists): bytes that are not UTF-8, a
byte-order mark, a file that cannot be read. Each is one line naming the file, the position and the fix,
exit 2 at start; a leading BOM is accepted and dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloading.exclude import read_exclusions
from dataloading.make_index import main as make_index
from dataloading.splits import read_index_csv
from dataloading.textfile import read_text
from engine.config import load_plan
from engine.errors import UserError
from engine.train import main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "digits.toml"
BOM = b"\xef\xbb\xbf"


def test_a_byte_that_is_not_utf8_is_named_by_line_column_and_offset(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"first line\nna\xc3\xafve caf\xe9 here\n")  # a valid two-byte character before the bad one
    with pytest.raises(UserError) as err:
        read_text(bad, "data.exclude = 'notes.txt'")
    text = str(err.value)
    assert "data.exclude = 'notes.txt'" in text and str(bad) in text
    assert "line 2, column 10 (byte 21)" in text and "0xe9" in text and "save the file as UTF-8" in text


def test_a_leading_bom_is_dropped():
    assert read_text_of(BOM + b"a = 1\n") == "a = 1\n"
    assert read_text_of(b"a = 1\n") == "a = 1\n"


def read_text_of(data: bytes) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.txt"
        path.write_bytes(data)
        return read_text(path, "f")


def test_a_directory_or_an_unreadable_file_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a directory, not a file"):
        read_text(tmp_path, "--cfg")
    locked = tmp_path / "locked.toml"
    locked.write_text("a = 1\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # root reads any file: fake the refusal instead of chmod
    with pytest.raises(UserError, match=r"locked\.toml: permission denied.*chmod u\+r"):
        read_text(locked, "--cfg")


def test_a_config_with_latin1_bytes_exits_2_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(DEMO.read_bytes() + b'\n[logging]\n# r\xe9sum\xe9\n')
    assert main(["--cfg", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cfg" in err[0] and "run.toml" in err[0] and "0xe9" in err[0]
    line = DEMO.read_bytes().count(b"\n") + 3
    assert f"line {line}, column 4" in err[0]


def test_a_config_with_a_bom_loads_like_one_without(tmp_path):
    cfg = tmp_path / "bom.toml"
    cfg.write_bytes(BOM + DEMO.read_bytes())
    assert load_plan(cfg).to_toml() == load_plan(DEMO).to_toml()


def test_a_config_path_that_is_a_directory_exits_2(tmp_path, capsys):
    assert main(["--cfg", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_an_index_csv_with_bad_bytes_names_the_key_the_file_and_the_line(tmp_path):
    csv = tmp_path / "one_percent.csv"
    csv.write_bytes(b"Index,Name\n3,a\n4,\xff\xfe\n")
    with pytest.raises(UserError, match=r"data.labelled_index = .*one_percent\.csv.*line 3, column 3 \(byte 17\)"):
        read_index_csv(str(csv), 10, key="data.labelled_index")


def test_an_index_csv_with_a_bom_reads_its_index_column(tmp_path):
    csv = tmp_path / "excel.csv"
    csv.write_bytes(BOM + b"Index,Name\r\n3,a\r\n1,b\r\n")
    assert list(read_index_csv(str(csv), 10, key="data.labelled_index")) == [1, 3]


def test_an_index_csv_that_is_a_directory_is_a_user_error(tmp_path):
    (tmp_path / "split.csv").mkdir()
    with pytest.raises(UserError, match=r"data.unlabelled_index = .*is a directory"):
        read_index_csv(str(tmp_path / "split.csv"), 10, key="data.unlabelled_index")


def test_an_exclusion_list_with_bad_bytes_is_a_user_error(tmp_path):
    listing = tmp_path / "bad_images.txt"
    listing.write_bytes(b"train/a/1.png\ttruncated\ntrain/b/\xe9t\xe9.png\n")
    with pytest.raises(UserError, match=r"data.exclude = .*bad_images\.txt.*line 2, column 9 \(byte 32\)"):
        read_exclusions(str(listing), str(tmp_path))


def test_an_exclusion_list_with_a_bom_excludes_its_first_path(tmp_path):
    listing = tmp_path / "bad_images.txt"
    listing.write_bytes(BOM + b"train/a/1.png\ttruncated\n")
    assert read_exclusions(str(listing), str(tmp_path)) == {str(tmp_path / "train" / "a" / "1.png")}


def image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("key", ["labelled_index", "exclude"])
def test_bad_bytes_in_a_data_list_stop_the_run_before_any_work(tmp_path, capsys, key):
    root = image_folder(tmp_path / "data")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"Index\n1\n\x80\n")
    out = tmp_path / "run"
    code = main(["--cfg", str(DEMO), "--out", str(out), "--run.stages", "finetune", "--data.source", "imagefolder",
                 "--data.root", str(root), "--model.num_classes", "2", "--data." + key, str(listing)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.{key}" in err[0] and "line 3, column 1 (byte 8)" in err[0]
    assert not out.exists()  # refused in the preflight: nothing written


def test_a_names_list_with_bad_bytes_makes_make_index_exit_2(tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    names = tmp_path / "1percent.txt"
    names.write_bytes(b"0.png\n\xe91.png\n")
    assert make_index([str(root), "--names", str(names), "--out", str(tmp_path / "idx.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--names" in err[0] and "line 2, column 1 (byte 6)" in err[0]
    assert not (tmp_path / "idx.csv").exists()
