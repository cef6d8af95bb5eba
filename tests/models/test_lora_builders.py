"""lora_* builders: torchtune's names and fields, from Python and from a YAML config (also a torchtune path)."""

import inspect

import pytest
import torch
from omegaconf import OmegaConf

import qattune.models as models
from qattune.config.instantiate import instantiate
from qattune.config.signatures import component_signature
from qattune.errors import QattuneError
from qattune.models import LoRALinear, get_lora_config, split_lora
from qattune.quant import PTQQuantizer

TORCHTUNE_FIELDS = ["lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
                    "lora_dropout", "use_dora", "quantize_base"]  # fmt: skip
SIZED = ["lora_llama2_7b", "lora_llama3_8b", "lora_llama3_1_8b", "lora_llama3_2_1b", "lora_llama3_2_3b",
         "lora_smollm2_135m", "lora_smollm2_360m", "lora_smollm2_1_7b", "lora_qwen2_5_0_5b", "lora_qwen2_5_1_5b",
         "lora_qwen2_5_3b", "lora_qwen2_5_7b", "lora_qwen2_5_1_5b_base", "lora_qwen2_5_1_5b_instruct",
         "lora_qwen2_5_7b_base", "lora_qwen2_5_7b_instruct", "lora_qwen2_5_14b_base",
         "lora_qwen2_5_14b_instruct"]  # fmt: skip


@pytest.mark.parametrize("name", SIZED)
def test_sized_builders_take_torchtune_fields(name):
    builder = getattr(models, name)
    params = inspect.signature(builder).parameters
    assert list(params) == TORCHTUNE_FIELDS
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    dropout = 0.05 if name == "lora_llama2_7b" else 0.0  # torchtune's defaults
    assert defaults == dict(apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=8, lora_alpha=16.0,
                            lora_dropout=dropout, use_dora=False, quantize_base=False)  # fmt: skip
    static = component_signature(f"qattune.models.{name}")  # what `qattune validate` reads, without importing
    assert static.names == TORCHTUNE_FIELDS


def test_llama3_2_1b_sizes_and_trainable_count():
    with torch.device("meta"):
        model = models.lora_llama3_2_1b(["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                                        lora_rank=64, lora_alpha=128)  # fmt: skip
    r, dim, kv, hidden = 64, 2048, 512, 8192
    per_layer = r * (dim + dim) + r * (dim + kv) + r * (dim + dim) + 2 * r * (dim + hidden) + r * (hidden + dim)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * per_layer
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 16 * 6
    assert model.layers[3].attn.q_proj.scale == 2.0
    base, config = split_lora(model)
    assert config.lora_rank == 64 and config.lora_attn_modules == ["q_proj", "v_proj", "output_proj"]
    assert type(base.layers[3].mlp.up_proj) is torch.nn.Linear


def test_refused_options():
    with pytest.raises(QattuneError) as err, torch.device("meta"):
        models.lora_smollm2_135m(["q_proj"], apply_lora_to_output=True)
    assert "output head is tied to the token embedding" in str(err.value)
    with pytest.raises(QattuneError) as err:
        models.lora_llama(128, 1, 4, 2, 64, 128, 64, ["q_proj"], use_dora=True)
    assert str(err.value) == "use_dora=true: DoRA is not supported by qattune; set use_dora: false"


QLORA_REFUSAL = ("quantize_base=true (torchtune's qlora_* builders) trains LoRA over an NF4 base, but {}; in recipe "
                 "qat_lora set base_quantizer={{_component_: qattune.quant.PTQQuantizer, scheme: nf4}} and no "
                 "quantizer, or use a lora_* builder with quantize_base: false")


def _qlora_model(base_scheme):
    """The qat_lora order for quantize_base=true: build, split, convert the base (or not), apply LoRA again."""
    torch.manual_seed(0)
    base, lora = split_lora(models.lora_llama(128, 2, 4, 2, 64, 128, 64, ["q_proj", "v_proj"],
                                              apply_lora_to_mlp=True, quantize_base=True))  # fmt: skip
    if base_scheme is not None:
        PTQQuantizer(base_scheme).convert(base)
    models.apply_lora(base, **lora.to_dict())
    return base


def test_quantize_base_needs_an_nf4_base_before_the_first_forward():
    tokens = torch.randint(0, 128, (2, 8))
    model = _qlora_model("nf4")
    assert type(model.layers[0].mlp.up_proj.base).__name__ == "QuantizedLinear"
    logits = model(tokens)
    assert logits.shape == (2, 8, 128) and torch.isfinite(logits).all()
    assert len(model._forward_pre_hooks) == 0  # checked once, then out of the way
    for scheme, found in ((None, "it was not converted"), ("8w", "base_quantizer converted it to 8w")):
        with pytest.raises(QattuneError) as err:
            _qlora_model(scheme)(tokens)
        assert str(err.value) == QLORA_REFUSAL.format(found)


def test_qwen2_5_base_builders_have_the_base_checkpoints_context():
    with torch.device("meta"):
        assert models.lora_qwen2_5_1_5b_base(["q_proj"]).config.max_seq_len == 131_072
        assert models.lora_qwen2_5_1_5b_instruct(["q_proj"]).config.max_seq_len == 32_768
        assert models.lora_qwen2_5_14b_base(["q_proj"]).config.norm_eps == 1e-5


YAML = """
model:
  _component_: {component}
  vocab_size: 128
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 64
  intermediate_dim: 128
  max_seq_len: 64
  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']
  apply_lora_to_mlp: True
  apply_lora_to_output: True
  lora_rank: 8
  lora_alpha: 16
  lora_dropout: 0.05
"""


def test_generic_builder_from_yaml():
    cfg = OmegaConf.create(YAML.format(component="qattune.models.lora_llama"))
    model = instantiate(cfg.model)
    config = get_lora_config(model)
    assert config.lora_attn_modules == ["q_proj", "v_proj", "output_proj"] and config.lora_dropout == 0.05
    assert isinstance(model.output, LoRALinear) and isinstance(model.layers[1].attn.o_proj, LoRALinear)
    assert not isinstance(model.layers[1].attn.k_proj, LoRALinear)
    assert model.layers[0].mlp.gate_proj.dropout.p == 0.05


def test_torchtune_component_path_resolves_to_builder():
    cfg = OmegaConf.create({"model": {"_component_": "torchtune.models.llama3_2.lora_llama3_2_1b",
                                      "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                                      "apply_lora_to_output": False, "lora_rank": 8, "lora_alpha": 16,
                                      "lora_dropout": 0.0}})  # fmt: skip
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.config.num_layers == 16 and model.weights_tied()
    assert sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}) == [
        "q_proj", "v_proj"]


def test_validate_catches_unknown_module_name_before_building():
    from qattune.config.validate import validate_config

    cfg = OmegaConf.create({"model": {"_component_": "qattune.models.lora_llama3_8b",
                                      "lora_attn_modules": ["q_proj", "o_proj"], "lora_rank": 8}})  # fmt: skip
    problems = [str(p) for p in validate_config(cfg)]
    assert problems == ["model.lora_attn_modules: expected a list of one of 'q_proj', 'k_proj', 'v_proj', "
                        "'output_proj', got ['q_proj', 'o_proj']"]  # fmt: skip
