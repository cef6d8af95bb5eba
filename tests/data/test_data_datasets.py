"""Dataset builders: tokens and labels for text, instruct, chat and python_docs; bad-input errors."""

import json

import pytest
import torch
from data_byte_tokenizer import BOS, EOS, ByteTokenizer

from qattune.data import (
    IGNORE_INDEX,
    alpaca_dataset,
    alpaca_prompt,
    chat_dataset,
    instruct_dataset,
    next_token_labels,
    python_docs_dataset,
    python_docs_rows,
    text_completion_dataset,
)
from qattune.errors import QattuneError

TOK = ByteTokenizer()


def byte_ids(text):
    return [b + 3 for b in text.encode()]


def test_next_token_labels_shift_and_mask():
    assert next_token_labels([10, 11, 12, 13], [True, False, True, True]).tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX]


def test_text_completion_txt_paragraphs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\nsecond line\n\nnext para\n")
    ds = text_completion_dataset(TOK, str(path))
    assert len(ds) == 2
    item = ds[1]
    expected = [BOS] + byte_ids("next para") + [EOS]
    assert item["tokens"].tolist() == expected
    assert item["labels"].tolist() == expected[1:] + [IGNORE_INDEX]


def test_text_completion_jsonl_column_and_splitting(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["a" * 25, "short"]
    path.write_text("\n".join(json.dumps({"body": d, "other": 1}) for d in docs))
    ds = text_completion_dataset(TOK, str(path), column="body", max_seq_len=8)
    full = [BOS] + byte_ids(docs[0]) + [EOS]  # 27 tokens -> pieces of 8, 8, 8, 3
    assert [len(ds[i]["tokens"]) for i in range(4)] == [8, 8, 8, 3]
    assert torch.cat([ds[i]["tokens"] for i in range(4)]).tolist() == full
    # labels run across piece boundaries: the last label of piece 0 is the first token of piece 1
    assert ds[0]["labels"][-1].item() == ds[1]["tokens"][0].item()
    assert ds[3]["labels"][-1].item() == IGNORE_INDEX
    assert ds[4]["tokens"].tolist() == [BOS] + byte_ids("short") + [EOS]


def test_text_completion_parquet(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": ["xy", "zzz"]}).to_parquet(str(path))
    ds = text_completion_dataset(TOK, str(path))
    assert [ds[i]["tokens"].tolist() for i in range(2)] == [[BOS] + byte_ids("xy") + [EOS], [BOS] + byte_ids("zzz") + [EOS]]


def test_missing_file_and_missing_column_errors(tmp_path):
    with pytest.raises(QattuneError, match=r"dataset file 'nope/data.jsonl' does not exist"):
        text_completion_dataset(TOK, "nope/data.jsonl")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "t"}) + "\n")
    with pytest.raises(QattuneError) as err:
        text_completion_dataset(TOK, str(path), column="text")
    assert "no column 'text'" in str(err.value) and "its columns are: body, title" in str(err.value)
    assert "\n" not in str(err.value)


def test_packed_needs_max_seq_len(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abc\n")
    with pytest.raises(QattuneError, match="packed=True needs max_seq_len; set dataset.max_seq_len or the "
                                           "tokenizer's max_seq_len"):
        text_completion_dataset(TOK, str(path), packed=True)


def _write_alpaca(tmp_path):
    rows = [
        {"instruction": "Add", "input": "2 3", "output": "5"},
        {"instruction": "Greet", "input": "", "output": "hi"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("train_on_input", [False, True])
def test_instruct_alpaca_labels(tmp_path, train_on_input):
    ds = instruct_dataset(TOK, str(_write_alpaca(tmp_path)), train_on_input=train_on_input)
    for index, (instruction, inp, out) in enumerate([("Add", "2 3", "5"), ("Greet", "", "hi")]):
        prompt = [BOS] + byte_ids(alpaca_prompt(instruction, inp))
        response = byte_ids(out) + [EOS]
        tokens = prompt + response
        item = ds[index]
        assert item["tokens"].tolist() == tokens
        if train_on_input:
            expected = tokens[1:] + [IGNORE_INDEX]
        else:
            expected = [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]
        assert item["labels"].tolist() == expected
    assert "### Input:" in alpaca_prompt("a", "b") and "### Input:" not in alpaca_prompt("a", "")


def test_instruct_truncation_and_refusal(tmp_path):
    path = _write_alpaca(tmp_path)
    greet = [BOS] + byte_ids(alpaca_prompt("Greet", "")) + byte_ids("hi") + [EOS]
    greet_labels = [IGNORE_INDEX] * (len(greet) - 4) + byte_ids("hi") + [EOS, IGNORE_INDEX]
    ds = instruct_dataset(TOK, str(path), max_seq_len=len(greet) - 1)
    # row 0 (longer prompt) loses its whole response and is dropped; row 1 loses its last position only
    assert len(ds) == 1
    assert ds[0]["tokens"].tolist() == greet[:-1] and ds[0]["labels"].tolist() == greet_labels[:-1]
    with pytest.raises(QattuneError, match=r"row 0 has \d+ tokens, more than max_seq_len=20"):
        instruct_dataset(TOK, str(path), max_seq_len=20, truncate=False)


def test_chat_openai_and_sharegpt_agree(tmp_path):
    openai_rows = [{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]}]
    sharegpt_rows = [{"conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "yo"},
    ]}]
    (tmp_path / "o.json").write_text(json.dumps(openai_rows))
    (tmp_path / "s.json").write_text(json.dumps(sharegpt_rows))
    (tmp_path / "string.jsonl").write_text(json.dumps({"messages": json.dumps(openai_rows[0]["messages"])}) + "\n")
    a = chat_dataset(TOK, str(tmp_path / "o.json"))[0]
    as_string = chat_dataset(TOK, str(tmp_path / "string.jsonl"))[0]
    assert as_string["tokens"].tolist() == a["tokens"].tolist()
    b = chat_dataset(TOK, str(tmp_path / "s.json"), conversation_column="conversations", conversation_style="sharegpt")[0]
    assert a["tokens"].tolist() == b["tokens"].tolist() and a["labels"].tolist() == b["labels"].tolist()
    prefix = [BOS] + byte_ids("<system>") + byte_ids("be brief") + [EOS] + byte_ids("<user>") + byte_ids("hi") + [EOS]
    prefix += byte_ids("<assistant>")
    assert a["tokens"].tolist() == prefix + byte_ids("yo") + [EOS]
    # only the assistant's content and its EOS are targets
    assert a["labels"].tolist() == [IGNORE_INDEX] * (len(prefix) - 1) + byte_ids("yo") + [EOS, IGNORE_INDEX]


def test_chat_bad_turn_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"messages": [{"speaker": "x", "text": "y"}]}]))
    with pytest.raises(QattuneError, match="row 0 has a message without 'role'/'content'"):
        chat_dataset(TOK, str(tmp_path / "bad.json"), conversation_style="openai")


def test_python_docs_splits_are_disjoint_and_packable():
    train = {r["topic"] for r in python_docs_rows("train")}
    val = {r["topic"] for r in python_docs_rows("validation")}
    from pydoc_data.topics import topics

    assert train.isdisjoint(val) and train | val == set(topics) and 0 < len(val) < len(train)
    ds = python_docs_dataset(TOK, split="validation", max_seq_len=512, packed=True)
    total_tokens = sum(len(r["text"].encode()) + 2 for r in python_docs_rows("validation"))
    assert len(ds) == -(-total_tokens // 512)
    assert all(ds[i]["tokens"].shape == (512,) for i in range(len(ds)))


def test_hub_name_offline_is_refused(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QattuneError, match="'someone/corpus' is not a local file and the Hugging Face hub is offline"):
        text_completion_dataset(TOK, "someone/corpus")


def test_instruct_chat_template_uses_the_tokenizer(tmp_path):
    ds = instruct_dataset(TOK, str(_write_alpaca(tmp_path)), template="chat")
    prefix = [BOS] + byte_ids("<user>") + byte_ids("Add\n\n2 3") + [EOS] + byte_ids("<assistant>")
    assert ds[0]["tokens"].tolist() == prefix + byte_ids("5") + [EOS]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * (len(prefix) - 1) + byte_ids("5") + [EOS, IGNORE_INDEX]


def test_torchtune_spellings_data_files_column_map_and_tokenizer_max_seq_len(tmp_path):
    rows = [{"prompt": "Greet", "response": "hi"}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    ds = instruct_dataset(TOK, "json", data_files=str(path), column_map={"instruction": "prompt", "output": "response"})
    assert ds[0]["tokens"].tolist() == [BOS] + byte_ids(alpaca_prompt("Greet", "")) + byte_ids("hi") + [EOS]
    with pytest.raises(QattuneError, match="dataset file 'missing.json' \\(data_files\\) does not exist"):
        instruct_dataset(TOK, "json", data_files="missing.json")
    with pytest.raises(QattuneError, match="column_map has unknown key"):
        instruct_dataset(TOK, str(path), column_map={"question": "prompt"})

    class ShortTokenizer(ByteTokenizer):
        max_seq_len = 6

    text = tmp_path / "t.txt"
    text.write_text("abcdefghij\n")
    pieces = text_completion_dataset(ShortTokenizer(), "text", data_files=str(text))
    assert [len(pieces[i]["tokens"]) for i in range(len(pieces))] == [6, 6]


def test_alpaca_dataset_from_a_local_copy_trains_on_input_by_default(tmp_path):
    ds = alpaca_dataset(TOK, source=str(_write_alpaca(tmp_path)))
    tokens = ds[1]["tokens"].tolist()
    assert ds[1]["labels"].tolist() == tokens[1:] + [IGNORE_INDEX]


def test_text_packing_without_split_across_pack_keeps_pieces_whole(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["abcdefgh", "xyz"]))
    ds = text_completion_dataset(TOK, str(path), max_seq_len=6, packed=True, split_across_pack=False)
    # "abcdefgh" -> 10 tokens -> pieces of 6 and 4; "xyz" -> 5 tokens does not fit the 2 left
    assert [ds[i]["document_ids"].tolist() for i in range(len(ds))] == [[0] * 6, [0] * 4 + [1] * 2, [0] * 5 + [1]]
    assert ds[1]["input_pos"].tolist() == [0, 1, 2, 3, 0, 1]


def test_chat_new_system_prompt_replaces_the_system_message(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    ds = chat_dataset(TOK, str(tmp_path / "c.json"), new_system_prompt="new")
    assert TOK.decode(ds[0]["tokens"].tolist()).startswith("<system>new")
