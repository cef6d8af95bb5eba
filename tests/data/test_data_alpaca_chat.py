"""The Alpaca prompt as a chat (`template: alpaca_chat`), and torchtune's alpaca builders through their aliases:
the Llama 3 layout written out by hand and tokenized piece by piece, never through qattune's chat code."""

import base64
import json

import pytest
from data_byte_tokenizer import EOS, ByteTokenizer

from qattune.config import instantiate
from qattune.data import IGNORE_INDEX, alpaca_dataset, alpaca_prompt, instruct_dataset, next_token_labels
from qattune.errors import QattuneError
from qattune.tokenizers import llama3_tokenizer

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Greet the user", "input": "", "output": "Hello there!"},
    {"instruction": "  Spaces around  ", "input": None, "output": "  padded answer \n\n"},
]


@pytest.fixture
def ranks_path(tmp_path):
    """A Llama 3 ranks file of the 256 single bytes: text ids are bytes, special tokens start at 256."""
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return str(path)


@pytest.fixture
def rows_path(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


BEGIN, END, START_HEADER, END_HEADER, EOT = 256, 257, 262, 263, 265  # Llama 3's special-token offsets


def torchtune_llama3_alpaca(row, train_on_input):
    """torchtune's alpaca sample for Llama 3: bos; the user message (the Alpaca prompt, stripped), masked
    unless train_on_input; the assistant message (header, stripped output, <|eot_id|>), trained; then
    <|end_of_text|>, untrained. Ids of the byte-level ranks file are the text's bytes."""
    def text(value):
        return list(value.encode())

    def message(role, content):
        return [START_HEADER] + text(role) + [END_HEADER] + text("\n\n") + text(content.strip()) + [EOT]

    user = message("user", alpaca_prompt(row["instruction"], row["input"] or ""))
    answer = message("assistant", row["output"])
    ids = [BEGIN] + user + answer + [END]
    trained = [False] + [train_on_input] * len(user) + [True] * len(answer) + [False]
    return ids, next_token_labels(ids, trained).tolist()


def build(component, ranks_path, rows_path, max_seq_len=None, **arguments):
    tokenizer = instantiate({"_component_": "torchtune.models.llama3.llama3_tokenizer", "path": ranks_path,
                             "max_seq_len": max_seq_len})
    return instantiate({"_component_": component, "source": "json", "data_files": rows_path, **arguments},
                       tokenizer=tokenizer)


@pytest.mark.parametrize("component", ["torchtune.datasets.alpaca_dataset",
                                       "torchtune.datasets.alpaca_cleaned_dataset"])
@pytest.mark.parametrize("train_on_input", [True, False])
def test_torchtune_alpaca_config_gives_torchtunes_ids_and_labels(ranks_path, rows_path, component, train_on_input):
    """Checked against torchtune 0.6.1 (alpaca_dataset, llama3_tokenizer on cl100k's ranks padded to Llama 3's
    ids): equal ids and labels for 6 rows (with, without and with a null input, whitespace to strip, a 240-token
    one), train_on_input true and false, without and with the tokenizer's max_seq_len (64), where qattune only
    leaves out the one sample that truncation left with nothing to train on."""
    ds = build(component, ranks_path, rows_path, train_on_input=train_on_input)
    assert len(ds) == len(ROWS)
    for index, row in enumerate(ROWS):
        ids, labels = torchtune_llama3_alpaca(row, train_on_input)
        assert ds[index]["tokens"].tolist() == ids
        assert ds[index]["labels"].tolist() == labels


def test_torchtune_alpaca_truncation_ends_with_an_untrained_eos(ranks_path, rows_path):
    """torchtune cuts to the tokenizer's max_seq_len and puts <|end_of_text|> in the last place."""
    ids, labels = torchtune_llama3_alpaca(ROWS[1], train_on_input=True)
    length = len(ids) - 3
    ds = build("torchtune.datasets.alpaca_dataset", ranks_path, rows_path, max_seq_len=length)
    assert ds[1]["tokens"].tolist() == ids[: length - 1] + [END]
    assert ds[1]["labels"].tolist() == labels[: length - 2] + [IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(QattuneError, match=r"row 0 has \d+ tokens, more than max_seq_len"):
        build("qattune.data.alpaca_dataset", ranks_path, rows_path, max_seq_len=length, template="alpaca_chat",
              torchtune_layout=True, truncate=False)


def test_alpaca_chat_alone_is_the_chat_template(ranks_path, rows_path):
    """Without torchtune_layout: the tokenizer's chat template as is (no eos after <|eot_id|>, as Hugging Face's
    apply_chat_template), loss on the answer and its <|eot_id|>."""
    ds = alpaca_dataset(llama3_tokenizer(ranks_path), rows_path, template="alpaca_chat", train_on_input=False)
    ids, _ = torchtune_llama3_alpaca(ROWS[0], train_on_input=False)
    answer = list(b"5") + [EOT]
    assert ds[0]["tokens"].tolist() == ids[:-1]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * (len(ids) - 1 - len(answer) - 1) + answer + [IGNORE_INDEX]


def test_qattunes_alpaca_builder_keeps_the_plain_alpaca_text(ranks_path, rows_path):
    ds = alpaca_dataset(llama3_tokenizer(ranks_path), rows_path)
    assert ds[0]["tokens"].tolist() == [BEGIN] + list((alpaca_prompt("Add the numbers.", "2 3") + "5").encode()) + [END]


def test_torchtune_layout_adds_no_eos_after_an_answer_ending_with_it(rows_path):
    """The byte test tokenizer ends each message with its eos: torchtune_layout appends none, and trains the
    answer's header with it."""
    ds = instruct_dataset(ByteTokenizer(), rows_path, template="alpaca_chat", torchtune_layout=True)
    answer = [b + 3 for b in b"<assistant>5"] + [EOS]
    assert ds[0]["tokens"].tolist()[-len(answer):] == answer
    assert ds[0]["labels"].tolist()[-len(answer) - 1:] == answer + [IGNORE_INDEX]


@pytest.mark.parametrize("arguments, message", [
    ({"torchtune_layout": True}, "torchtune_layout needs a chat template (the Alpaca text has no messages); "
                                 "set template=alpaca_chat or template=chat, or remove torchtune_layout"),
    ({"template": "vicuna"}, "template='vicuna' is not an instruct template; use one of alpaca, alpaca_chat, chat"),
])
def test_chat_only_arguments_need_a_chat_template(rows_path, arguments, message):
    with pytest.raises(QattuneError) as err:
        instruct_dataset(ByteTokenizer(), rows_path, **arguments)
    assert str(err.value) == message
