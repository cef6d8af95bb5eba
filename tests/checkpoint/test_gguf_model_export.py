"""Model-side GGUF export: tensor sources for each family's layout, re-import equality, tokenizer metadata."""

import gguf
import jinja2
import pytest
import torch

from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint, export_gguf, gguf_tensor_sources
from qattune.checkpoint.gguf_export import bpe_tokenizer_metadata, gguf_tokenizer_metadata
from qattune.errors import QattuneError
from qattune.models import get_adapter, llama
from qattune.quant import PTQQuantizer, QuantizedLinear
from qattune.tokenizers import byte_tokenizer, gguf_tokenizer
from qattune.tokenizers.byte_level import byte_to_char

TOKENS = torch.tensor([[5, 200, 17, 3, 99, 250, 1, 64, 33]])
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]


def tokenizer_file(path, chatml: bool = False):
    """A byte-level BPE tokenizer as GGUF metadata: 256 bytes, the MERGES, and control tokens."""
    table = byte_to_char()
    merged = [a + b for a, b in (m.split(" ") for m in MERGES)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml else ["<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([table[b] for b in range(256)] + merged + specials)
    writer.add_token_types([1] * (256 + len(merged)) + [3] * len(specials))
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(256 + len(merged))
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def converted(seed: int, scheme: str, **model_kwargs):
    torch.manual_seed(seed)
    model = llama(vocab_size=272, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
                  max_seq_len=128, **model_kwargs)
    PTQQuantizer(scheme).convert(model)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernels = False
    return model.eval()


@pytest.mark.parametrize("model_type, scheme, model_kwargs", [
    ("llama3_1", "q8_0", {"tie_embeddings": True, "rope_scaling_factor": 8.0,
                          "rope_base": 500000.0}),
    ("qwen2", "q4_0", {"qkv_bias": True, "tie_embeddings": True}),
])
def test_exported_file_reimports_to_the_same_model(tmp_path, model_type, scheme, model_kwargs):
    model = converted(0, scheme, **model_kwargs)
    adapter = get_adapter(model_type)
    tokenizer = gguf_tokenizer_metadata(None, 272, tokenizer_file(tmp_path / "tok.gguf"))
    path = export_gguf(model, model.config, adapter, tmp_path / "m.gguf", tokenizer, name="tiny")
    imported = GGUFCheckpointer(str(path))
    assert imported.config == model.config
    names = {t.name for t in imported.reader.tensors}
    assert "output.weight" not in names  # tied, and head and embedding are both Q8_0
    assert ("rope_freqs.weight" in names) == ("rope_scaling_factor" in model_kwargs)
    assert imported.metadata["general.name"] == "tiny"
    with torch.no_grad():
        torch.testing.assert_close(build_model_from_checkpoint(imported)(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


def test_a_tied_head_quantized_unlike_the_embedding_is_written_on_its_own(tmp_path):
    torch.manual_seed(1)
    model = llama(272, 2, 4, 2, 64, 128, 128, tie_embeddings=True)
    PTQQuantizer("q4_0", quantize_output=False).convert(model)
    sources = gguf_tensor_sources(model, model.config, get_adapter("llama"))
    assert isinstance(sources["output.weight"], torch.Tensor)
    torch.testing.assert_close(sources["output.weight"], model.output.weight, rtol=0, atol=0)
    assert sources["token_embd.weight"] is model.tok_embeddings


def test_export_refuses_an_unconverted_model_and_a_non_gguf_scheme(tmp_path):
    model = llama(272, 1, 4, 2, 64, 128, 128)
    with pytest.raises(QattuneError, match="needs a converted model"):
        export_gguf(model, model.config, get_adapter("llama"), tmp_path / "m.gguf", {})
    PTQQuantizer("8da4w").convert(model)
    with pytest.raises(QattuneError, match="scheme '8da4w' cannot be stored in a GGUF file"):
        export_gguf(model, model.config, get_adapter("llama"), tmp_path / "m.gguf", {})


def test_bpe_tokenizer_metadata_rebuilds_the_same_tokenizer(tmp_path):
    source = gguf_tokenizer(tokenizer_file(tmp_path / "src.gguf"))
    meta = bpe_tokenizer_metadata(source, vocab_size=272)
    tokens = meta["tokenizer.ggml.tokens"][0]
    assert len(tokens) == 272 and tokens[-1] == "[PAD271]" and meta["tokenizer.ggml.token_type"][0][-1] == 5
    assert meta["tokenizer.ggml.merges"][0] == MERGES and meta["tokenizer.ggml.pre"] == "smollm"
    model = converted(2, "q8_0")
    path = export_gguf(model, model.config, get_adapter("llama"), tmp_path / "m.gguf", meta)
    rebuilt = gguf_tokenizer(str(path))
    text = "hello world, hello 2024 worlds"
    assert rebuilt.encode(text) == source.encode(text)
    assert source.encode("hello world", add_eos=False) == [259, 264]  # "hello", " world": the merges applied


def test_chatml_template_renders_what_the_tokenizer_renders(tmp_path):
    from qattune.tokenizers.chat_format import ChatMLFormat

    tokenizer = gguf_tokenizer(tokenizer_file(tmp_path / "chat.gguf", chatml=True))
    messages = [{"role": "user", "content": "It's 2 + 2?"}, {"role": "assistant", "content": "4"}]
    for system in (None, "You are a helpful 'assistant'."):
        tokenizer.chat_format = ChatMLFormat(system)
        template = bpe_tokenizer_metadata(tokenizer, 272)["tokenizer.chat_template"]
        for prompt in (False, True):
            rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=prompt)
            assert rendered == tokenizer.render_chat(messages, add_generation_prompt=prompt)


def test_tokenizers_without_a_gguf_form_are_refused():
    with pytest.raises(QattuneError, match="ByteTokenizer has no GGUF tokenizer form"):
        gguf_tokenizer_metadata(byte_tokenizer(), 260)
    with pytest.raises(QattuneError, match="needs the model's tokenizer"):
        gguf_tokenizer_metadata(None, 260)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    tokenizer = gguf_tokenizer(tokenizer_file(tmp_path / "t.gguf"))
    with pytest.raises(QattuneError, match="266 tokens but the model only 200 embedding rows"):
        bpe_tokenizer_metadata(tokenizer, 200)
