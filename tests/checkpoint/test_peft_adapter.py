"""PEFT adapter folders: exact file layout, PEFT <-> qattune round trips with equal logits, errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qattune.checkpoint import (
    HFCheckpointer,
    build_model_from_checkpoint,
    load_peft_adapter,
    save_peft_adapter,
    write_peft_adapter,
)
from qattune.errors import QattuneError
from qattune.models import LoRALinear, apply_lora, get_lora_config, merged_state_dict

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

HF_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)  # fmt: skip
ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


def save_hf_model(path, family):
    """A tiny random transformers model with weights of order 1 (so every tensor shows in the logits)."""
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SIZES))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_SIZES, tie_word_embeddings=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == 64 else 0.0))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture
def peft():
    # the dev extras pin a peft that accepts their torchao 0.15 (peft 0.19+ refuses torchao < 0.16)
    return pytest.importorskip("peft")


def qattune_model(base_dir):
    return build_model_from_checkpoint(HFCheckpointer(str(base_dir))).eval()


def trained_lora(base_dir, seed=3, **settings):
    model = apply_lora(qattune_model(base_dir), **settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_a.normal_(0.0, 0.3)
                module.lora_b.normal_(0.0, 0.3)
    return model


def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 16))


def hf_logits(model):
    with torch.no_grad():
        return model(tokens()).logits


def test_adapter_file_layout(tmp_path, llama_dir):
    model = trained_lora(llama_dir, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True,
                         apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.05)  # fmt: skip
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "revision": None, "inference_mode": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["down_proj", "gate_proj", "lm_head", "q_proj", "up_proj", "v_proj"],
        "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None,
    }  # fmt: skip
    expected_shapes = {"base_model.model.lm_head.lora_A.weight": (4, 64),
                       "base_model.model.lm_head.lora_B.weight": (128, 4)}  # fmt: skip
    for i in range(2):
        for module, (n_in, n_out) in {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32),
                                      "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
                                      "mlp.down_proj": (128, 64)}.items():  # fmt: skip
            expected_shapes[f"base_model.model.model.layers.{i}.{module}.lora_A.weight"] = (4, n_in)
            expected_shapes[f"base_model.model.model.layers.{i}.{module}.lora_B.weight"] = (n_out, 4)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected_shapes
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        assert torch.equal(f.get_tensor(key), model.layers[1].attn.v_proj.lora_b)

    save_peft_adapter(model, out, dtype=torch.bfloat16)  # replaces the folder, in the asked dtype
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None


@pytest.mark.parametrize(
    "family, settings",
    [
        ("llama", dict(lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True, apply_lora_to_output=True)),
        ("qwen2", dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)),  # q/v biases, tied head
    ],
)
def test_peft_loads_qattune_adapter_with_same_logits(tmp_path, peft, family, settings, llama_dir, qwen_dir):
    base_dir = llama_dir if family == "llama" else qwen_dir
    model = trained_lora(base_dir, lora_rank=4, lora_alpha=12.0, **settings)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir), model_type=family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_logits = hf_logits(hf)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    expected = hf_logits(peft_model)
    with torch.no_grad():
        actual = model(tokens())
    assert (expected - base_logits).abs().max() > 0.5  # the adapter is loaded and matters
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()


def test_qattune_loads_peft_adapter_with_same_logits(tmp_path, peft, llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    lora_config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])  # fmt: skip
    peft_model = peft.get_peft_model(hf, lora_config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(tmp_path / "from_peft")
    expected = hf_logits(peft_model.eval())

    model = load_peft_adapter(qattune_model(llama_dir), tmp_path / "from_peft")
    assert get_lora_config(model).to_dict() == dict(lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True,
                                                    apply_lora_to_output=False, lora_rank=4, lora_alpha=12.0,
                                                    lora_dropout=0.1)  # fmt: skip
    with torch.no_grad():
        actual = model.eval()(tokens())
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()

    # loading into a model that already has the same adapters overwrites their weights
    again = load_peft_adapter(apply_lora(qattune_model(llama_dir), **get_lora_config(model).to_dict()),
                              tmp_path / "from_peft")  # fmt: skip
    with torch.no_grad():
        assert torch.equal(again.eval()(tokens()), actual)


def save_merged_with_adapter(model, base_dir, output_dir, step):
    checkpointer = HFCheckpointer(str(base_dir), output_dir=str(output_dir))
    return checkpointer.save(merged_state_dict(model), step,
                             write_extra=lambda d: write_peft_adapter(model, d / "adapter"))  # fmt: skip


def test_merged_checkpoint_and_adapter_in_one_save(tmp_path, llama_dir):
    model = trained_lora(llama_dir, lora_attn_modules=["q_proj", "output_proj"], apply_lora_to_mlp=True,
                         apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0)  # fmt: skip
    with torch.no_grad():
        expected = model(tokens())
    checkpointer = HFCheckpointer(str(llama_dir), output_dir=str(tmp_path))
    with pytest.raises(QattuneError) as err:  # beside the merged weights, transformers would apply it twice
        checkpointer.save(merged_state_dict(model), "step_1", write_extra=lambda d: write_peft_adapter(model, d))
    assert str(err.value).endswith("holds a model (config.json): transformers would apply an adapter saved there "
                                   "on top of that model's weights; write the adapter to a subfolder such as "
                                   "'adapter'")  # fmt: skip
    assert not (tmp_path / "step_1").exists()

    step = save_merged_with_adapter(model, llama_dir, tmp_path, "step_2")
    assert sorted(p.name for p in (step / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(step).eval()
    # merged weights round differently from base + adapter: float32 rounding on logits of magnitude ~7
    assert torch.allclose(hf_logits(merged), expected, atol=1e-4, rtol=0), (hf_logits(merged) - expected).abs().max()
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert (hf_logits(merged) - hf_logits(base)).abs().max() > 0.5  # the merged adapters matter
    assert isinstance(model.layers[0].attn.q_proj, LoRALinear)  # the training model is unchanged


def test_peft_loads_adapter_subfolder_of_a_checkpoint(tmp_path, peft, llama_dir):
    model = trained_lora(llama_dir, lora_attn_modules=["k_proj"], apply_lora_to_mlp=True, lora_rank=2,
                         lora_alpha=2.0)  # fmt: skip
    step = save_merged_with_adapter(model, llama_dir, tmp_path, "step_3")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    adapted = peft.PeftModel.from_pretrained(base, step / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(hf_logits(adapted), model(tokens()), atol=1e-5, rtol=0)


def test_load_errors(tmp_path, llama_dir):
    model = trained_lora(llama_dir, lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    folder = save_peft_adapter(model, tmp_path / "adapter")

    with pytest.raises(QattuneError) as err:
        load_peft_adapter(qattune_model(llama_dir), tmp_path / "nowhere")
    assert str(err.value) == (f"{tmp_path / 'nowhere' / 'adapter_config.json'} not found; a PEFT adapter folder "
                              "holds adapter_config.json and adapter_model.safetensors")  # fmt: skip

    other = apply_lora(qattune_model(llama_dir), lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8.0)
    with pytest.raises(QattuneError) as err:
        load_peft_adapter(other, folder)
    assert str(err.value) == (f"{folder / 'adapter_model.safetensors'}: the adapter's layers differ from the "
                              "model's LoRA layers (e.g. 'layers.0.attn.v_proj')")  # fmt: skip

    other = apply_lora(qattune_model(llama_dir), lora_attn_modules=["q_proj", "v_proj"], lora_rank=2, lora_alpha=8.0)
    with pytest.raises(QattuneError, match=r"r=4, lora_alpha=8 but the model's LoRA layers have rank 2, alpha 8.0"):
        load_peft_adapter(other, folder)

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(QattuneError) as err:
        load_peft_adapter(qattune_model(llama_dir), folder)
    assert str(err.value) == (f"{folder / 'adapter_config.json'}: use_dora=true is not supported; qattune loads "
                              "plain LoRA adapters (use_dora=false)")  # fmt: skip

    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, 64)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(QattuneError) as err:
        load_peft_adapter(qattune_model(llama_dir), folder)
    assert str(err.value) == (f"{folder / 'adapter_model.safetensors'}: tensor "
                              "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' is not a "
                              "LoRA A/B weight of a layer of this model")  # fmt: skip

    tensors = {k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj" not in k and ".default." not in k}
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(QattuneError) as err:  # q_proj in layer 0 only: not expressible as qattune settings
        load_peft_adapter(qattune_model(llama_dir), folder)
    assert "cannot be expressed as qattune LoRA settings (near 'layers.1.attn.q_proj')" in str(err.value)

    with pytest.raises(QattuneError) as err:
        save_peft_adapter(qattune_model(llama_dir), tmp_path / "empty")
    assert str(err.value) == "model Transformer has no LoRA adapters to save; apply LoRA first"
    assert not (tmp_path / "empty").exists()
