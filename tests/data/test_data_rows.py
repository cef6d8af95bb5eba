"""What rows become: nulls and non-text content refused, content parts joined, dropped rows counted, one
length limit (truncate=False holds whatever the tokenizer's max_seq_len), torchtune's instruct_dataset."""

import json
import logging

import pytest
from data_byte_tokenizer import BOS, EOS, ByteTokenizer

from qattune.config import instantiate
from qattune.config.aliases import torchtune_alias
from qattune.data import IGNORE_INDEX, alpaca_dataset, alpaca_prompt, chat_dataset, input_output_dataset, instruct_dataset
from qattune.errors import QattuneError
from qattune.tokenizers import byte_tokenizer

TOK = ByteTokenizer()


def byte_ids(text):
    return [b + 3 for b in text.encode()]


def turn(role, content):
    return byte_ids(f"<{role}>") + byte_ids(content) + [EOS]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def refusal(build, *args, **kwargs):
    with pytest.raises(QattuneError) as err:
        build(*args, **kwargs)
    return str(err.value)


def test_null_instruction_or_output_is_refused_and_null_input_is_empty(tmp_path):
    path = write_rows(tmp_path / "n.jsonl", [{"instruction": "q", "input": None, "output": "a"},
                                             {"instruction": "r", "input": "x", "output": None}])
    assert refusal(instruct_dataset, TOK, path) == f"dataset '{path}' row 1 column 'output' is null; fill it in or remove the row"
    path = write_rows(tmp_path / "m.jsonl", [{"instruction": None, "input": "x", "output": "a"}])
    assert refusal(instruct_dataset, TOK, path) == (
        f"dataset '{path}' row 0 column 'instruction' is null; fill it in or remove the row")
    path = write_rows(tmp_path / "ok.jsonl", [{"instruction": "q", "input": None, "output": "a"}])
    assert instruct_dataset(TOK, path)[0]["tokens"].tolist() == [BOS] + byte_ids(alpaca_prompt("q", "") + "a") + [EOS]


def test_null_chat_values_are_refused(tmp_path):
    sharegpt = write_rows(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                    {"from": "gpt", "value": None}]}])
    assert refusal(chat_dataset, TOK, sharegpt, conversation_column="conversations") == (
        f"dataset '{sharegpt}' row 0 turn 1 value is null; fill it in or remove the row")
    openai = write_rows(tmp_path / "o.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]},
                                               {"messages": [{"role": "user", "content": None}]}])
    assert refusal(chat_dataset, TOK, openai) == f"dataset '{openai}' row 1 turn 0 content is null; fill it in or remove the row"
    none = write_rows(tmp_path / "none.jsonl", [{"messages": None}])
    assert refusal(chat_dataset, TOK, none) == (
        f"dataset '{none}' row 0 has a NoneType, not a list of turns; remove the row or fix the data")


def test_text_content_parts_are_joined_and_other_parts_refused(tmp_path):
    parts = write_rows(tmp_path / "p.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}])
    item = chat_dataset(TOK, parts)[0]
    prefix = [BOS] + turn("user", "hi there") + byte_ids("<assistant>")
    assert item["tokens"].tolist() == prefix + byte_ids("yo") + [EOS]
    assert item["labels"].tolist() == [IGNORE_INDEX] * (len(prefix) - 1) + byte_ids("yo") + [EOS, IGNORE_INDEX]
    image = write_rows(tmp_path / "i.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "ok"}]}])
    assert refusal(chat_dataset, TOK, image) == (
        f"dataset '{image}' row 0 turn 0 content part 1 has type 'image_url'; only text parts can be trained on "
        "(remove the other parts, or the row)")


def test_unknown_openai_role_names_dataset_and_row(tmp_path):
    path = write_rows(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": "a"}]},
                                             {"messages": [{"role": "human", "content": "hi"}]}])
    assert refusal(chat_dataset, TOK, path) == (
        f"dataset '{path}' row 1 turn 0 has role 'human'; use one of system, user, assistant "
        "(conversation_style='sharegpt' reads from/value turns)")


def test_data_files_rows_are_named_by_the_file(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"instruction": "q", "output": None}])
    assert refusal(instruct_dataset, TOK, "json", data_files=path) == (
        f"dataset '{path}' row 0 column 'output' is null; fill it in or remove the row")


def _long_answer_rows(tmp_path):
    return write_rows(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])


def test_rows_cut_to_nothing_are_counted_in_one_warning(tmp_path, caplog):
    path = _long_answer_rows(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qattune.data"):
        ds = chat_dataset(TOK, path, max_seq_len=30)
    assert len(ds) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset '{path}': 1 of 2 samples have no token to train on after truncation to max_seq_len=30 "
        "and are left out"]
    assert refusal(chat_dataset, TOK, path, max_seq_len=10) == (
        f"dataset '{path}': no sample has a token to train on after truncation to max_seq_len=10 "
        "(it cut off every response); raise max_seq_len")


def test_rows_without_an_assistant_turn_are_counted_in_one_warning(tmp_path, caplog):
    path = write_rows(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    with caplog.at_level(logging.WARNING, logger="qattune.data"):
        assert len(chat_dataset(TOK, path)) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset '{path}': 1 of 2 samples have no token to train on (the first is row 1: with "
        "train_on_input=False, a row with no assistant message) and are left out"]


def test_truncate_false_holds_when_the_tokenizer_has_max_seq_len(tmp_path):
    path = _long_answer_rows(tmp_path)
    tokenizer = byte_tokenizer(max_seq_len=20)
    messages = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a"}]
    full_ids = byte_tokenizer().tokenize_messages(messages)[0]  # a tokenizer with no limit of its own
    full_length = len(full_ids)
    assert full_length > 40
    assert refusal(chat_dataset, tokenizer, path, truncate=False) == (
        f"dataset '{path}' row 0 has {full_length} tokens, more than max_seq_len=20; raise max_seq_len or set truncate=True")
    # the dataset's limit is the one limit: the tokenizer's (smaller) own limit does not cut first
    ds = chat_dataset(tokenizer, path, max_seq_len=100)
    assert ds[0]["tokens"].tolist() == full_ids and tokenizer.max_seq_len == 20


def test_input_output_dataset_is_torchtunes_instruct_dataset(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    ds = input_output_dataset(TOK, "json", data_files=path, column_map={"input": "question", "output": "answer"},
                              new_system_prompt="be brief")
    prefix = [BOS] + turn("system", "be brief") + turn("user", "2+2?") + byte_ids("<assistant>")
    assert ds[0]["tokens"].tolist() == prefix + byte_ids("4") + [EOS]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * (len(prefix) - 1) + byte_ids("4") + [EOS, IGNORE_INDEX]
    assert torchtune_alias("torchtune.datasets.instruct_dataset").target == "qattune.data.input_output_dataset"
    from_config = instantiate({"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "data_files": path,
                               "column_map": {"input": "question", "output": "answer"}, "new_system_prompt": "be brief",
                               "train_on_input": False, "packed": False, "split": "train"}, tokenizer=TOK)
    assert from_config[0]["tokens"].tolist() == ds[0]["tokens"].tolist()
    assert refusal(input_output_dataset, TOK, path) == (
        f"dataset '{path}' has no column 'input', 'output'; its columns are: question, answer")
    assert refusal(input_output_dataset, TOK, path, column_map={"instruction": "question"}) == (
        "input_output_dataset column_map has unknown key(s) ['instruction']; use input, output")


def test_instruct_new_system_prompt_needs_the_chat_template(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"instruction": "Greet", "output": "hi"}])
    ds = instruct_dataset(TOK, path, template="chat", new_system_prompt="be kind")
    assert ds[0]["tokens"].tolist() == [BOS] + turn("system", "be kind") + turn("user", "Greet") + turn("assistant", "hi")
    assert refusal(instruct_dataset, TOK, path, new_system_prompt="be kind") == (
        "new_system_prompt needs a chat template (the Alpaca text has no messages); "
        "set template=alpaca_chat or template=chat, or remove new_system_prompt")


def test_alpaca_dataset_takes_column_map(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"prompt": "Greet", "response": "hi"}])
    ds = alpaca_dataset(TOK, "json", data_files=path, column_map={"instruction": "prompt", "output": "response"})
    assert ds[0]["tokens"].tolist() == [BOS] + byte_ids(alpaca_prompt("Greet", "") + "hi") + [EOS]
