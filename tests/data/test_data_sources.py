"""Reading user data: every unreadable, empty or malformed source is one line naming the file; torchtune's
loading arguments (data_files lists, name, data_dir, filter_fn); text split by line or paragraph."""

import json
import shutil
from pathlib import Path

import pytest
from data_byte_tokenizer import BOS, EOS, ByteTokenizer

from qattune.config import instantiate
from qattune.data import load_rows, text_completion_dataset
from qattune.errors import QattuneError

TOK = ByteTokenizer()


def byte_ids(text):
    return [b + 3 for b in text.encode()]


def error_of(**kwargs):
    with pytest.raises(QattuneError) as err:
        load_rows(**kwargs)
    return str(err.value)


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.csv", "empty.parquet"])
def test_empty_file_says_it_is_empty(tmp_path, name):
    path = write(tmp_path / name, "")
    assert error_of(source=path) == f"dataset file '{path}' is empty; put rows in it or name another file"
    assert error_of(source="json", data_files=path) == (
        f"dataset file '{path}' (data_files) is empty; put rows in it or name another file")


def test_folder_of_empty_files_and_whitespace_only_file_hold_no_rows(tmp_path):
    (tmp_path / "folder").mkdir()
    write(tmp_path / "folder" / "a.jsonl", "")
    folder = str(tmp_path / "folder")
    assert error_of(source=folder) == f"dataset folder '{folder}' holds no rows; put rows in it or name another source"
    path = write(tmp_path / "blank.jsonl", "\n\n")
    assert error_of(source=path) == (
        f"dataset file '{path}' holds no rows for split 'train' ([] and {{}} rows count as none); put data in it "
        "or check the split")


def test_malformed_json_lines_name_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": "bad\n{"text": "ok2"}\n')
    expected = f"dataset file '{path}' line 3 is not valid JSON (Unterminated string starting at: column 10); fix the file"
    assert error_of(source=path) == expected
    good = write(tmp_path / "good.jsonl", '{"text": "fine"}\n')
    assert error_of(source="json", data_files=[good, path]) == expected
    not_object = write(tmp_path / "list.jsonl", '{"text": "a"}\n[1, 2]\n')
    assert error_of(source=not_object) == (
        f"dataset file '{not_object}' line 2 holds a JSON list, not an object such as {{\"text\": ...}}; fix the file")


def test_malformed_pretty_printed_json_names_the_line(tmp_path):
    path = write(tmp_path / "rows.json", '[\n {"text": "a"},\n {"text": }\n]\n')
    assert error_of(source=path) == f"dataset file '{path}' line 3 is not valid JSON (Expecting value: column 11); fix the file"


@pytest.mark.parametrize("content", ["[]", "{}\n{}\n"])
def test_rows_without_columns(tmp_path, content):
    path = write(tmp_path / "rows.json", content)
    assert error_of(source=path) == (
        f"dataset file '{path}' holds no rows for split 'train' ([] and {{}} rows count as none); put data in it "
        "or check the split")


def test_ragged_csv_and_bad_parquet_give_the_root_cause(tmp_path):
    csv = write(tmp_path / "r.csv", 'text,other\n"a",1\n"b",2,3,4\n')
    assert error_of(source=csv) == (
        f"dataset file '{csv}' could not be read as csv (ParserError: Error tokenizing data. C error: "
        "Expected 2 fields in line 3, saw 4); check that the file is valid csv")
    parquet = write(tmp_path / "b.parquet", "not parquet")
    assert error_of(source="parquet", data_files=parquet) == (
        f"dataset file '{parquet}' could not be read as parquet (ArrowInvalid: Parquet magic bytes not found in "
        "footer. Either the file is corrupted or this is not a parquet file.); check that the file is valid parquet")


def test_data_files_needs_a_builder_name_as_source(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n')
    assert error_of(source="jsonl", data_files=path) == (
        "dataset source 'jsonl' with data_files must be a file type, one of csv, json, parquet, text "
        "(json reads .json and .jsonl). Did you mean 'json'?")
    assert error_of(source="text") == (
        "dataset source 'text' is a file type; name the file with data_files=PATH (or give the file's path as source)")
    assert error_of(source="json", data_files={"train": path}) == (
        f"data_files must be a file path or a list of file paths, got {{'train': '{path}'}}")


def test_no_split_and_unknown_suffix(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n')
    assert error_of(source=path, split="validation") == (
        f"dataset file '{path}' has no split 'validation' (ValueError: Unknown split \"validation\". Should be one "
        "of ['train'].); a local file has only 'train' (slice it: train[:90%])")
    assert error_of(source=path, split="train[:0%]") == (
        f"dataset file '{path}' holds no rows for split 'train[:0%]' ([] and {{}} rows count as none); put data in it "
        "or check the split")
    odd = write(tmp_path / "d.xyz", "a")
    assert error_of(source=odd).startswith(f"dataset file '{odd}' has an unknown type '.xyz'; use one of")


def test_data_files_list_concatenates_and_every_file_must_exist(tmp_path):
    first = write(tmp_path / "a.jsonl", '{"text": "ab"}\n')
    second = write(tmp_path / "b.jsonl", '{"text": "cd"}\n')
    ds = text_completion_dataset(TOK, "json", data_files=[first, second])
    assert [ds[i]["tokens"].tolist() for i in range(2)] == [[BOS] + byte_ids(t) + [EOS] for t in ("ab", "cd")]
    missing = str(tmp_path / "c.jsonl")
    assert error_of(source="json", data_files=[first, missing]).startswith(
        f"dataset file '{missing}' (data_files) does not exist; check the path")


def test_text_builder_splits_by_line_and_a_text_path_by_paragraph(tmp_path):
    path = write(tmp_path / "t.txt", "one\ntwo\n\nthree\n")
    by_line = text_completion_dataset(TOK, "text", data_files=path)
    assert [by_line[i]["tokens"].tolist() for i in range(len(by_line))] == [
        [BOS] + byte_ids(t) + [EOS] for t in ("one", "two", "three")]
    by_paragraph = text_completion_dataset(TOK, path)
    assert [by_paragraph[i]["tokens"].tolist() for i in range(len(by_paragraph))] == [
        [BOS] + byte_ids(t) + [EOS] for t in ("one\ntwo", "three")]
    assert len(text_completion_dataset(TOK, "text", data_files=path, text_sample_by="document")) == 1


def test_data_dir_and_name_reach_load_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "a.jsonl", '{"text": "x"}\n')
    assert list(load_rows("json", data_dir=str(folder))) == [{"text": "x"}]
    import datasets

    seen = {}

    def fake_load_dataset(*args, **kwargs):
        seen.update(kwargs, path=args[0])
        return datasets.Dataset.from_list([{"text": "y"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    load_rows("someone/corpus", split="test", name="subset", data_dir="part")
    assert seen == {"path": "someone/corpus", "split": "test", "name": "subset", "data_dir": "part"}


def test_hub_offline_without_a_cached_copy(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert error_of(source="someone/corpus") == (
        "dataset 'someone/corpus' is not a local file and the Hugging Face hub is offline "
        "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set), with no copy in the local cache; pass a local file path instead")


def test_hub_offline_reads_a_cached_copy(tmp_path, monkeypatch):
    import datasets

    built = datasets.load_dataset("json", data_files=write(tmp_path / "d.jsonl", '{"text": "cached"}\n'),
                                  cache_dir=str(tmp_path / "build"), split="train")
    arrow = Path(built.cache_files[0]["filename"])
    # the layout `datasets` keeps a downloaded hub dataset in: <cache>/<owner>___<name>/<config>/<version>/<hash>/
    cached = tmp_path / "cache" / "someone___corpus" / "default" / "0.0.0" / arrow.parent.name
    cached.mkdir(parents=True)
    shutil.copy(arrow.parent / "dataset_info.json", cached)
    shutil.copy(arrow, cached / "corpus-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert list(load_rows("someone/corpus")) == [{"text": "cached"}]


def test_unreachable_hub_is_one_line_without_retries(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_dataset would retry for half a minute")

    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    message = error_of(source="someone/corpus")
    head, _, tail = message.partition(" (hub.invalid: ")
    assert head == "dataset 'someone/corpus' is not a local file and the Hugging Face hub could not be reached"
    assert tail.endswith("); pass a local file (e.g. source=data.jsonl), or set HF_DATASETS_OFFLINE=1 to use a "
                         "copy in the local cache")


def keep_long(row, min_chars=3):
    """A filter_fn for the tests: rows whose text has at least `min_chars` characters."""
    return len(row["text"]) >= min_chars


def test_filter_fn_from_a_partial_component(tmp_path):
    path = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in ("ab", "abcd", "xyz")))
    ds = instantiate({"_component_": "qattune.data.text_completion_dataset", "source": path,
                      "filter_fn": {"_component_": "test_data_sources.keep_long", "_partial_": True}}, tokenizer=TOK)
    assert [ds[i]["tokens"].tolist() for i in range(len(ds))] == [[BOS] + byte_ids(t) + [EOS] for t in ("abcd", "xyz")]
    assert error_of(source=path, filter_fn=lambda row: False) == (
        f"dataset '{path}': filter_fn keeps none of its 3 rows; check the function")
    assert error_of(source=path, filter_fn=lambda row: row["title"]) == (
        f"dataset '{path}' row 0: filter_fn raised KeyError: 'title'; fix the function or the row")
    assert error_of(source=path, filter_fn="keep_long") == (
        f"dataset '{path}': filter_fn must be a function (a _component_ with _partial_: true), got str")
