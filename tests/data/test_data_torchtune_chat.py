"""torchtune's chat_dataset and instruct_dataset through their aliases (`torchtune_layout`): the Llama 3 layout
written out by hand message by message and tokenized piece by piece, never through qattune's chat code.

Checked against torchtune 0.6.1 (chat_dataset with conversation_style openai and sharegpt, instruct_dataset;
llama3_tokenizer on cl100k's ranks padded to Llama 3's ids): equal ids and labels for 106 of 114 samples: single
and multi-turn conversations, with and without a system message in the data, ending with an answer or with a
user message, train_on_input true and false, with and without new_system_prompt, without and with a max_seq_len
that truncates (40). The 8 others are one OpenAI row whose content is a list of two text parts, which torchtune
strips and tokenizes part by part (qattune joins the parts, then strips). Not counted: the 6 samples torchtune
keeps with every label -100 after truncation (qattune leaves them out).
"""

import base64
import json

import pytest

from qattune.config import instantiate
from qattune.data import IGNORE_INDEX, chat_dataset, input_output_dataset, next_token_labels
from qattune.errors import QattuneError
from qattune.tokenizers import llama3_tokenizer
from qattune.tokenizers.chat_format import Llama2ChatFormat

BEGIN, END, START_HEADER, END_HEADER, EOT = 256, 257, 262, 263, 265  # Llama 3's special-token offsets
SYSTEM = "New system prompt."

CHATS = [
    [("user", "Hi there"), ("assistant", "Hello!")],
    [("system", "  Be brief. "), ("user", "2+2?"), ("assistant", " 4 \n")],
    [("user", "Name a colour"), ("assistant", "Blue"), ("user", "Another"), ("assistant", "Green, héllo 日本語")],
    [("system", "Answer in French."), ("user", "Hello"), ("assistant", "Bonjour"), ("user", "Bye")],
]
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture
def ranks_path(tmp_path):
    """A Llama 3 ranks file of the 256 single bytes: text ids are bytes, special tokens start at 256."""
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return str(path)


def write_rows(tmp_path, style):
    if style == "openai":
        rows = [{"messages": [{"role": role, "content": text} for role, text in chat]} for chat in CHATS]
    else:
        rows = [{"conversations": [{"from": SPEAKERS[role], "value": text} for role, text in chat]} for chat in CHATS]
    path = tmp_path / f"{style}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def torchtune_llama3(chat, train_on_input, new_system_prompt=None):
    """torchtune's sample for Llama 3: bos (untrained); each message whole, header and <|eot_id|> included,
    trained when it is the assistant's, the others only with train_on_input, except the new_system_prompt
    message (which replaces the data's system message), never trained; then <|end_of_text|>, untrained."""
    def text(value):
        return list(value.encode())

    messages = [(role, content, role == "assistant" or train_on_input) for role, content in chat]
    if new_system_prompt is not None:
        messages = [("system", new_system_prompt, False)] + [m for m in messages if m[0] != "system"]
    ids, trained = [BEGIN], [False]
    for role, content, is_trained in messages:
        message = [START_HEADER] + text(role) + [END_HEADER] + text("\n\n") + text(content.strip()) + [EOT]
        ids, trained = ids + message, trained + [is_trained] * len(message)
    ids, trained = ids + [END], trained + [False]
    return ids, next_token_labels(ids, trained).tolist()


def build(node, ranks_path, max_seq_len=None):
    tokenizer = instantiate({"_component_": "torchtune.models.llama3.llama3_tokenizer", "path": ranks_path,
                             "max_seq_len": max_seq_len})
    return instantiate(node, tokenizer=tokenizer)


def chat_node(path, style, **arguments):
    return {"_component_": "torchtune.datasets.chat_dataset", "source": "json", "data_files": path,
            "conversation_column": "messages" if style == "openai" else "conversations",
            "conversation_style": style, **arguments}


@pytest.mark.parametrize("style", ["openai", "sharegpt"])
@pytest.mark.parametrize("train_on_input", [False, True])
@pytest.mark.parametrize("new_system_prompt", [None, SYSTEM])
def test_torchtune_chat_config_gives_torchtunes_ids_and_labels(tmp_path, ranks_path, style, train_on_input,
                                                              new_system_prompt):
    path = write_rows(tmp_path, style)
    ds = build(chat_node(path, style, train_on_input=train_on_input, new_system_prompt=new_system_prompt), ranks_path)
    assert len(ds) == len(CHATS)
    for index, chat in enumerate(CHATS):
        ids, labels = torchtune_llama3(chat, train_on_input, new_system_prompt)
        assert ds[index]["tokens"].tolist() == ids
        assert ds[index]["labels"].tolist() == labels


def test_torchtune_chat_truncation_ends_with_an_untrained_eos(tmp_path, ranks_path):
    """torchtune cuts to the tokenizer's max_seq_len and puts <|end_of_text|> in the last place, untrained. With
    40: chat 0 (39 tokens) is whole, chats 1 and 2 are cut inside an answer, chat 3 (its answer from token 43 on)
    has nothing left to train on and is left out (torchtune keeps it with every label -100)."""
    path = write_rows(tmp_path, "openai")
    ds = build(chat_node(path, "openai"), ranks_path, max_seq_len=40)
    assert len(ds) == 3
    assert ds[0]["tokens"].tolist() == torchtune_llama3(CHATS[0], False)[0]
    for index in (1, 2):
        ids, labels = torchtune_llama3(CHATS[index], False)
        assert ds[index]["tokens"].tolist() == ids[:39] + [END]
        assert ds[index]["labels"].tolist() == labels[:38] + [IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(QattuneError, match=r"row 1 has 50 tokens, more than max_seq_len=40"):
        chat_dataset(llama3_tokenizer(ranks_path), path, max_seq_len=40, truncate=False, torchtune_layout=True)


@pytest.mark.parametrize("train_on_input", [False, True])
@pytest.mark.parametrize("new_system_prompt", [None, SYSTEM])
def test_torchtune_instruct_config_gives_torchtunes_ids_and_labels(tmp_path, ranks_path, train_on_input,
                                                                  new_system_prompt):
    rows = [{"question": "Add 2 and 3", "answer": "5"}, {"question": "  spaced  ", "answer": "\n answer \n"}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    ds = build({"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "data_files": str(path),
                "column_map": {"input": "question", "output": "answer"}, "train_on_input": train_on_input,
                "new_system_prompt": new_system_prompt}, ranks_path)
    for index, row in enumerate(rows):
        ids, labels = torchtune_llama3([("user", row["question"]), ("assistant", row["answer"])], train_on_input,
                                       new_system_prompt)
        assert ds[index]["tokens"].tolist() == ids
        assert ds[index]["labels"].tolist() == labels


def test_without_torchtune_layout_the_chat_template_is_as_is(tmp_path, ranks_path):
    """qattune's own builders keep the chat template's layout: no eos after the chat, the assistant's content and
    <|eot_id|> trained, its header not."""
    path = write_rows(tmp_path, "openai")
    ids, _ = torchtune_llama3(CHATS[0], train_on_input=False)
    answer = list(b"Hello!") + [EOT]
    for ds in (chat_dataset(llama3_tokenizer(ranks_path), path),
               input_output_dataset(llama3_tokenizer(ranks_path), str(_instruct_rows(tmp_path)))):
        assert ds[0]["tokens"].tolist() == ids[:-1]
        assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * (len(ids) - 2 - len(answer)) + answer + [IGNORE_INDEX]


def _instruct_rows(tmp_path):
    path = tmp_path / "io.json"
    path.write_text(json.dumps([{"input": "Hi there", "output": "Hello!"}]))
    return path


def test_a_system_message_folded_into_the_user_message_takes_its_flag(tmp_path, ranks_path):
    """Llama 2's layout folds the system message into the first [INST]: with new_system_prompt and
    train_on_input, the folded text is trained with the user message (torchtune's Llama2ChatTemplate gives the
    merged message the user's mask). Llama 2's answer ends with the eos already: no second one is added."""
    tokenizer = llama3_tokenizer(ranks_path)
    tokenizer.chat_format = Llama2ChatFormat(bos="<|begin_of_text|>", eos="<|end_of_text|>")
    path = write_rows(tmp_path, "openai")
    ds = chat_dataset(tokenizer, path, new_system_prompt="S", train_on_input=True, torchtune_layout=True)
    prompt = list(b"[INST] <<SYS>>\nS\n<</SYS>>\n\nHi there [/INST]")
    ids = [BEGIN] + prompt + list(b" Hello! ") + [END]
    assert ds[0]["tokens"].tolist() == ids
    assert ds[0]["labels"].tolist() == ids[1:] + [IGNORE_INDEX]
    untrained = chat_dataset(tokenizer, path, new_system_prompt="S", torchtune_layout=True)
    assert untrained[0]["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + list(b" Hello! ") + [END, IGNORE_INDEX]


def test_the_dated_llama3_system_message_is_untrained_unless_it_holds_the_datas(tmp_path, ranks_path):
    """With date_string, the template's dated system message comes before the chat: never trained, as torchtune
    trains no token it adds (bos); a system message of the data is written into it, which is then trained
    with train_on_input as that message."""
    path = write_rows(tmp_path, "openai")
    ds = chat_dataset(llama3_tokenizer(ranks_path, date_string="26 Jul 2024"), path, train_on_input=True,
                      torchtune_layout=True)
    dated = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    header = [START_HEADER] + list(b"system") + [END_HEADER] + list(b"\n\n")
    ids, labels = torchtune_llama3(CHATS[0], train_on_input=True)
    preamble = [BEGIN] + header + list(dated.encode()) + [EOT]
    assert ds[0]["tokens"].tolist() == preamble + ids[1:]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * (len(preamble) - 1) + labels
    with_system = ds[1]["labels"].tolist()
    assert IGNORE_INDEX not in with_system[:-2]  # the dated text is the data's system message: trained
