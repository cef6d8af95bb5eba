"""HF, Meta and sharded checkpoints round-trip exactly; saves are atomic; transformers loads what qattune saves."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qattune.checkpoint import HFCheckpointer, MetaCheckpointer, build_model_from_checkpoint
from qattune.checkpoint.hf import TOKENIZER_FILES, parse_size
from qattune.models import get_adapter, llama

torch.set_num_threads(1)

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 7, "eos_token_id": 9,
}  # fmt: skip


def hf_tensors(num_layers=2, dim=64, kv_dim=32, hidden=96, vocab=128, bias=False, head=True):
    """A random state dict in Hugging Face names, written independently of qattune's adapter."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    if head:
        shapes["lm_head.weight"] = (vocab, dim)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
            p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (kv_dim, dim),
            p + "self_attn.v_proj.weight": (kv_dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
            p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
        })  # fmt: skip
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (dim,), p + "self_attn.k_proj.bias": (kv_dim,),
                           p + "self_attn.v_proj.bias": (kv_dim,)})  # fmt: skip
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def write_hf_dir(path, tensors, config=HF_CONFIG, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def read_all_safetensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_hf_round_trip_gives_identical_tensors_and_keeps_config_and_tokenizer(tmp_path):
    tensors = hf_tensors()
    write_hf_dir(tmp_path / "src", tensors)
    (tmp_path / "src" / "tokenizer.json").write_text('{"model": "fake"}')
    (tmp_path / "src" / "generation_config.json").write_text('{"eos_token_id": 9}')
    ckpt = HFCheckpointer(str(tmp_path / "src"), output_dir=str(tmp_path / "out"))
    state_dict, config = ckpt.load()
    assert config["num_kv_heads"] == 2 and config["intermediate_dim"] == 96
    assert "layers.1.attn.k_proj.weight" in state_dict and "output.weight" in state_dict

    final = ckpt.save(state_dict, "step_3")
    assert final == tmp_path / "out" / "step_3"
    saved = read_all_safetensors(final)
    assert saved.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(saved[name], tensor), name
    config_out = json.loads((final / "config.json").read_text())
    assert (config_out["bos_token_id"], config_out["eos_token_id"]) == (7, 9)  # source keys kept
    assert config_out["num_key_value_heads"] == 2 and config_out["torch_dtype"] == "float32"
    assert (final / "tokenizer.json").read_text() == '{"model": "fake"}'
    assert (final / "generation_config.json").is_file()
    assert sorted(os.listdir(tmp_path / "out")) == ["step_3"]  # no temporary folder left behind


def test_sharded_save_and_load_with_index(tmp_path):
    tensors = hf_tensors()
    write_hf_dir(tmp_path / "src", tensors, shards=3)
    ckpt = HFCheckpointer(str(tmp_path / "src"))
    state_dict, _ = ckpt.load()  # files come from the index
    total = sum(t.numel() * t.element_size() for t in tensors.values())

    out = HFCheckpointer(str(tmp_path / "src"), max_shard_size=str(total // 4)).save(state_dict, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors)
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
            assert f.metadata() == {"format": "pt"}
    for fname in files:
        assert os.path.getsize(out / fname) < total // 4 + 4096  # each shard under the limit (+ header)
    reloaded, _ = HFCheckpointer(str(out)).load()
    assert all(torch.equal(reloaded[k], state_dict[k]) for k in state_dict)


def test_transformers_loads_what_qattune_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_dir(tmp_path / "src", hf_tensors(head=False), config={**HF_CONFIG, "tie_word_embeddings": True})
    ckpt = HFCheckpointer(str(tmp_path / "src"))
    model = build_model_from_checkpoint(ckpt).eval()
    out = ckpt.save(model.state_dict(), tmp_path / "saved")
    assert "lm_head.weight" not in read_all_safetensors(out)  # tied head saved once, as HF does
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)


def test_meta_round_trip_and_layout(tmp_path):
    """HF -> qattune -> Meta -> qattune -> HF gives identical tensors; Meta's q/k rows are interleaved."""
    tensors = hf_tensors()
    write_hf_dir(tmp_path / "hf", tensors)
    hf_ckpt = HFCheckpointer(str(tmp_path / "hf"))
    state_dict, _ = hf_ckpt.load()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"ranks")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    adapter = get_adapter("llama3")
    torch.save(adapter.to_meta(state_dict, hf_ckpt.config), meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(json.dumps(adapter.config_to_meta(hf_ckpt.config)))

    meta = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    # Independent check of the layout: Meta row 2j+1 of head h is HF row j + head_dim/2 of head h.
    hf_q = tensors["model.layers.0.self_attn.q_proj.weight"].view(4, 16, 64)
    meta_q = meta["layers.0.attention.wq.weight"].view(4, 16, 64)
    assert torch.equal(meta_q[:, 0::2], hf_q[:, :8]) and torch.equal(meta_q[:, 1::2], hf_q[:, 8:])
    assert torch.equal(meta["layers.0.feed_forward.w3.weight"], tensors["model.layers.0.mlp.up_proj.weight"])
    params = json.loads((meta_dir / "params.json").read_text())
    assert params["dim"] == 64 and params["n_kv_heads"] == 2

    meta_ckpt = MetaCheckpointer(str(meta_dir), model_type="llama3", output_dir=str(tmp_path))
    from_meta, config = meta_ckpt.load()
    assert config == hf_ckpt.model_config() | {"max_seq_len": 8192, "norm_eps": 1e-5}
    assert from_meta.keys() == state_dict.keys()
    assert all(torch.equal(from_meta[k], state_dict[k]) for k in state_dict)
    meta_out = meta_ckpt.save(from_meta, "meta_out")
    again = torch.load(meta_out / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(again[k], meta[k]) for k in meta)
    assert json.loads((meta_out / "params.json").read_text()) == params

    back = hf_ckpt.save(from_meta, tmp_path / "hf_again")
    saved = read_all_safetensors(back)
    assert all(torch.equal(saved[k], tensors[k]) for k in tensors)


def test_meta_params_json_of_published_models():
    """params.json as Meta publishes it gives the published SwiGLU widths and RoPE scaling."""
    llama3_2_1b = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
                   "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                   "vocab_size": 128256}  # fmt: skip
    cfg = get_adapter("llama3_2").config_from_meta(llama3_2_1b, 128256, tied=True)
    assert (cfg.intermediate_dim, cfg.rope_scaling_factor, cfg.max_seq_len) == (8192, 32.0, 131072)
    llama3_8b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                 "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}  # fmt: skip
    cfg = get_adapter("LLAMA3").config_from_meta(llama3_8b, 128256, tied=False)
    assert (cfg.intermediate_dim, cfg.rope_scaling_factor) == (14336, None)
    llama2_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    assert get_adapter("llama2").config_from_meta(llama2_7b, 32000, tied=False).intermediate_dim == 11008
    # and back: params.json written for those sizes reproduces the width with Meta's formula
    assert get_adapter("llama3").config_to_meta(cfg)["multiple_of"] == 1024


def test_meta_tied_model_writes_the_head_and_reads_back_tied(tmp_path):
    write_hf_dir(tmp_path / "hf", hf_tensors(head=False), config={**HF_CONFIG, "tie_word_embeddings": True})
    hf_ckpt = HFCheckpointer(str(tmp_path / "hf"))
    state_dict, _ = hf_ckpt.load()
    assert "output.weight" not in state_dict
    adapter = get_adapter("llama3_2")
    (tmp_path / "meta").mkdir()
    meta = adapter.to_meta(state_dict, hf_ckpt.config)
    assert torch.equal(meta["output.weight"], meta["tok_embeddings.weight"])  # Meta's code has no tying
    torch.save(meta, tmp_path / "meta" / "consolidated.00.pth")
    (tmp_path / "meta" / "params.json").write_text(json.dumps(adapter.config_to_meta(hf_ckpt.config)))
    ckpt = MetaCheckpointer(str(tmp_path / "meta"), model_type="llama3_2")
    assert ckpt.config.tie_embeddings
    model = build_model_from_checkpoint(ckpt)
    assert model.weights_tied() and torch.equal(model.tok_embeddings.weight, state_dict["tok_embeddings.weight"])


@pytest.mark.parametrize("tied, factor", [(True, 32.0), (False, 8.0)])
def test_meta_scaled_rope_factor_is_32_for_tied_llama3_2_and_8_otherwise(tmp_path, tied, factor):
    """Meta's 3.1 and 3.2 params.json both say only use_scaled_rope; the tie tells 3.2 (factor 32) apart."""
    state_dict, _ = HFCheckpointer(str(_tiny_hf_dir(tmp_path, tied))).load()
    config = HFCheckpointer(str(tmp_path / "hf")).config
    meta = get_adapter("llama").to_meta(state_dict, config)
    (tmp_path / "meta").mkdir()
    torch.save(meta, tmp_path / "meta" / "consolidated.00.pth")
    params = {**get_adapter("llama").config_to_meta(config), "rope_theta": 500000.0, "use_scaled_rope": True}
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    ckpt = MetaCheckpointer(str(tmp_path / "meta"))  # no model_type: detected
    assert ckpt.config.rope_scaling_factor == factor and ckpt.config.tie_embeddings == tied
    assert ckpt.config.intermediate_dim == 96
    loaded, _ = ckpt.load()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    # what qattune writes names the factor, so it reads back the same whatever the family default
    written = ckpt.adapter.config_to_meta(ckpt.config)
    assert written["rope_scaling_factor"] == factor and written["use_scaled_rope"] is True


def _tiny_hf_dir(tmp_path, tied):
    write_hf_dir(tmp_path / "hf", hf_tensors(head=not tied), config={**HF_CONFIG, "tie_word_embeddings": tied})
    return tmp_path / "hf"


def test_meta_model_parallel_shards_are_joined(tmp_path):
    state_dict, _ = _tiny_qattune_state_dict()
    adapter = get_adapter("llama3")
    config = _tiny_config()
    full = adapter.to_meta(state_dict, config)
    halves = [{}, {}]
    for name, t in full.items():
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
            parts = t.chunk(2, dim=0)
        elif name.endswith(("wo.weight", "w2.weight")) or name == "tok_embeddings.weight":
            parts = t.chunk(2, dim=1)  # Llama 2 splits the embedding width
        else:
            parts = (t, t)
        for half, part in zip(halves, parts):
            half[name] = part.clone()
    for i, half in enumerate(halves):
        torch.save(half, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(adapter.config_to_meta(config)))
    loaded, _ = MetaCheckpointer(str(tmp_path)).load()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def _tiny_config():
    from qattune.models import TransformerConfig

    return TransformerConfig(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                             intermediate_dim=96, max_seq_len=8192)  # fmt: skip


def _tiny_qattune_state_dict():
    torch.manual_seed(0)
    model = llama(**_tiny_config().to_dict())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model


def test_save_is_atomic_when_writing_fails(tmp_path):
    write_hf_dir(tmp_path / "src", hf_tensors())
    ckpt = HFCheckpointer(str(tmp_path / "src"), output_dir=str(tmp_path / "out"))
    state_dict, _ = ckpt.load()
    first = ckpt.save(state_dict, "step_1")
    before = read_all_safetensors(first)

    def crash(tmp_dir):
        assert (tmp_dir / "model.safetensors").is_file() and tmp_dir.name.startswith(".step_") and ".tmp-" in tmp_dir.name
        raise RuntimeError("disk full")

    changed = {k: v + 1 for k, v in state_dict.items()}
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(changed, "step_1", write_extra=crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(changed, "step_2", write_extra=crash)
    assert sorted(os.listdir(tmp_path / "out")) == ["step_1"]  # no step_2, no temporary folders
    after = read_all_safetensors(first)
    assert all(torch.equal(after[k], before[k]) for k in before)  # old checkpoint untouched

    ckpt.save(changed, "step_1", write_extra=lambda d: (d / "recipe_state.pt").write_bytes(b"state"))
    assert (first / "recipe_state.pt").read_bytes() == b"state"
    assert torch.equal(read_all_safetensors(first)["model.norm.weight"], before["model.norm.weight"] + 1)


def test_checkpoint_files_in_torchtune_dict_form(tmp_path):
    write_hf_dir(tmp_path, hf_tensors(), shards=2)
    (tmp_path / "model.safetensors.index.json").unlink()
    files = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"}
    ckpt = HFCheckpointer(str(tmp_path), checkpoint_files=files)
    assert [p.name for p in ckpt.weight_files()] == ["model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"]  # fmt: skip
    assert len(ckpt.load()[0]) == 2 + 1 + 2 * 9


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123


def test_tokenizer_file_list_covers_llama3_layout():
    assert "original/tokenizer.model" in TOKENIZER_FILES and "tokenizer.json" in TOKENIZER_FILES
