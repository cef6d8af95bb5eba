"""GGUF import of small files written here with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0/1, Q5_1)."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qattune.checkpoint import GGUFCheckpointer, build_model_from_checkpoint  # noqa: E402
from qattune.errors import QattuneError  # noqa: E402
from qattune.models import get_adapter, llama  # noqa: E402

torch.set_num_threads(1)
Q = gguf.GGMLQuantizationType


def tiny_model(qkv_bias=False, tie=False):
    torch.manual_seed(0)
    model = llama(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                  max_seq_len=512, norm_eps=1e-6, rope_base=10000.0, qkv_bias=qkv_bias, tie_embeddings=tie)  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_gguf(path, arch, model, types=None, rope_freqs=None):
    """Write `model` as llama.cpp would: its names, its q/k layout, `types[name]` per tensor (default F32)."""
    cfg = model.config
    adapter = get_adapter("qwen2" if arch == "qwen2" else "llama")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in adapter.config_to_gguf(cfg).items():
        if key == "general.architecture":
            continue  # the writer adds it
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    for name, tensor in adapter.to_gguf(model.state_dict(), cfg).items():
        values = tensor.detach().numpy().astype(np.float32)
        kind = (types or {}).get(name, Q.F32)
        if kind == Q.F32:
            writer.add_tensor(name, values)
        elif kind == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_float_gguf_round_trips_exactly_and_gives_the_same_logits(tmp_path):
    model = tiny_model()
    write_gguf(tmp_path / "m.gguf", "llama", model)
    ckpt = GGUFCheckpointer(str(tmp_path / "m.gguf"))
    state_dict, config = ckpt.load()
    assert config == model.config.to_dict()
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    loaded = build_model_from_checkpoint(ckpt).eval()
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_gguf_files_are_stored_interleaved_for_llama_and_half_split_for_qwen2(tmp_path):
    model = tiny_model(qkv_bias=True)
    write_gguf(tmp_path / "q.gguf", "qwen2", model)
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    q = model.layers[0].attn.q_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.attn_q.weight"], q)  # qwen2: NeoX rotation, no permutation
    assert np.array_equal(stored["blk.0.attn_q.bias"], model.layers[0].attn.q_proj.bias.detach().numpy())
    loaded, config = GGUFCheckpointer(str(tmp_path / "q.gguf")).load()
    assert config["qkv_bias"] and torch.equal(loaded["layers.1.attn.k_proj.bias"], model.layers[1].attn.k_proj.bias)

    write_gguf(tmp_path / "l.gguf", "llama", tiny_model())
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "l.gguf")).tensors}
    q = tiny_model().layers[0].attn.q_proj.weight.detach().numpy().reshape(4, 64, 256)
    rows = stored["blk.0.attn_q.weight"].reshape(4, 64, 256)
    assert np.array_equal(rows[:, 0::2], q[:, :32]) and np.array_equal(rows[:, 1::2], q[:, 32:])


def test_quantized_tensors_are_dequantized_like_the_gguf_reference(tmp_path):
    model = tiny_model(tie=True)
    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0, "blk.0.ffn_down.weight": Q.Q5_1,
             "blk.1.attn_v.weight": Q.F16, "blk.1.ffn_up.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.BF16}  # fmt: skip
    write_gguf(tmp_path / "m.gguf", "llama", model, types)
    state_dict, config = GGUFCheckpointer(str(tmp_path)).load()  # a folder with one .gguf works too
    assert config["tie_embeddings"] and "output.weight" not in state_dict
    reference = get_adapter("llama").to_gguf(model.state_dict(), model.config)
    for gguf_name, ours_name in [("token_embd.weight", "tok_embeddings.weight"),
                                 ("blk.0.ffn_down.weight", "layers.0.mlp.down_proj.weight"),
                                 ("blk.1.attn_v.weight", "layers.1.attn.v_proj.weight"),
                                 ("blk.1.ffn_up.weight", "layers.1.mlp.up_proj.weight"),
                                 ("blk.1.ffn_gate.weight", "layers.1.mlp.gate_proj.weight")]:  # fmt: skip
        values = reference[gguf_name].detach().numpy()
        kind = types[gguf_name]
        expected = values.astype(np.float16).astype(np.float32) if kind == Q.F16 else gguf.quants.dequantize(
            gguf.quants.quantize(values, kind), kind
        )
        assert np.array_equal(state_dict[ours_name].numpy(), expected), gguf_name
        assert not np.array_equal(expected, values)  # the test really went through quantization
    # q/k rows come back to qattune's layout after dequantization
    q_ref = get_adapter("llama").to_gguf(model.state_dict(), model.config)["blk.0.attn_q.weight"].detach().numpy()
    q_deq = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(q_ref, Q.Q4_0), Q.Q4_0))
    from qattune.models.adapters import interleaved_to_half_split

    assert torch.equal(state_dict["layers.0.attn.q_proj.weight"], interleaved_to_half_split(q_deq, 4))


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    model = llama(256, 1, 4, 2, 256, 512, 512, rope_base=500000.0, rope_scaling_factor=8.0)
    from qattune.models.rope import RopeConfig, inverse_frequencies

    plain = inverse_frequencies(RopeConfig(64, 500000.0))
    factors = plain / inverse_frequencies(model.config.rope)  # what llama.cpp's converter stores
    assert torch.equal(get_adapter("llama").gguf_rope_freqs(model.config), factors)
    assert factors.max() == 8.0 and factors.min() == 1.0
    write_gguf(tmp_path / "m.gguf", "llama", model, rope_freqs=factors)
    config = GGUFCheckpointer(str(tmp_path / "m.gguf")).config
    assert (config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor,
            config.rope_original_max_seq_len) == (8.0, 1.0, 4.0, 8192)  # fmt: skip


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QattuneError) as err:
        GGUFCheckpointer(str(tmp_path / "g.gguf")).load()
    assert str(err.value) == (
        f"GGUF file {tmp_path / 'g.gguf'} has architecture 'gemma2', which qattune cannot import; "
        "supported architectures: llama, qwen2"
    )


def test_folder_without_a_gguf_file(tmp_path):
    with pytest.raises(QattuneError, match=r"expected one \.gguf file in .* \(found none\); set checkpoint_files"):
        GGUFCheckpointer(str(tmp_path))


def test_a_gguf_file_is_parsed_once_per_version(tmp_path):
    """The tokenizer, the config and the weights of one run read the same GGUFReader; a rewritten file is
    read again."""
    from qattune.gguf_reader import open_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tiny_model())
    first = GGUFCheckpointer(str(path))
    assert first.reader is GGUFCheckpointer(str(path)).reader is open_gguf(path)
    write_gguf(path, "llama", tiny_model(tie=True))
    reread = GGUFCheckpointer(str(path)).reader
    assert reread is not first.reader and "output.weight" not in {t.name for t in reread.tensors}
