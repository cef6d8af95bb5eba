"""torchtune config snippets through qattune's instantiate: torchao's default group sizes, the torchtune paths
qattune maps (ModuleSwap quantizers, qlora_*, Qwen2.5 sizes, 2024's torchtune.utils), and the torchtune
arguments qattune accepts only with the value that means what it does (refused otherwise, in one line)."""

import base64
import inspect
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from qattune.config import instantiate
from qattune.config.aliases import component_argument, torchtune_alias
from qattune.errors import QattuneError
from qattune.models import LoRALinear
from qattune.quant import PTQQuantizer, QATQuantizer

QUANTIZERS = "torchtune.training.quantization"


def _build(yaml: str, key: str, **kwargs):
    return instantiate(OmegaConf.create(yaml)[key], **kwargs)


def _refusal(yaml: str, key: str, **kwargs) -> str:
    """The one-line error building `key` gives (without a leading '<key>: ', should instantiate add one)."""
    with pytest.raises(QattuneError) as err:
        _build(yaml, key, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message.removeprefix(f"{key}: ")


# ---------------------------------------------------------------- 1. group sizes: torchtune's / torchao's defaults

QUANTIZER_YAML = """
quantizer:
  _component_: {component}
"""


@pytest.mark.parametrize("component, kind, scheme, group_size", [
    (f"{QUANTIZERS}.Int8DynActInt4WeightQATQuantizer", QATQuantizer, "8da4w", 256),
    (f"{QUANTIZERS}.Int4WeightOnlyQATQuantizer", QATQuantizer, "4w", 256),
    (f"{QUANTIZERS}.Int8DynActInt4WeightQuantizer", PTQQuantizer, "8da4w", 256),
    (f"{QUANTIZERS}.Int4WeightOnlyQuantizer", PTQQuantizer, "4w", 128),  # torchtune's own class: groupsize=128
    ("torchtune.utils.quantization.Int4WeightOnlyQuantizer", PTQQuantizer, "4w", 256),  # 2024: torchao's class
])
def test_quantizer_without_groupsize_uses_torchtunes_default(component, kind, scheme, group_size):
    quantizer = _build(QUANTIZER_YAML.format(component=component), "quantizer")
    assert type(quantizer) is kind
    assert (quantizer.config.scheme, quantizer.config.group_size) == (scheme, group_size)
    given = _build(QUANTIZER_YAML.format(component=component) + "  groupsize: 64\n", "quantizer")
    assert given.config.group_size == 64


def test_qat_group_size_defaults_are_the_installed_torchaos():
    qat = pytest.importorskip("torchao.quantization.qat")
    for name in ("Int8DynActInt4WeightQATQuantizer", "Int4WeightOnlyQATQuantizer"):
        torchao_default = inspect.signature(getattr(qat, name)).parameters["groupsize"].default
        assert torchtune_alias(f"{QUANTIZERS}.{name}").translate({})["group_size"] == torchao_default == 256


def test_scheme_conflicting_with_the_torchtune_class_is_refused():
    yaml = QUANTIZER_YAML.format(component=f"{QUANTIZERS}.Int8DynActInt4WeightQATQuantizer") + "  scheme: 4w\n"
    assert _refusal(yaml, "quantizer") == (
        "scheme=4w: this torchtune component means scheme=8da4w; remove scheme, or use qattune.quant.QATQuantizer")


# ---------------------------------------------------------------- 2. torchtune paths qattune maps

@pytest.mark.parametrize("name, scheme", [("Int8DynActInt4WeightQATQuantizerModuleSwap", "8da4w"),
                                          ("Int4WeightOnlyQATQuantizerModuleSwap", "4w")])
def test_module_swap_quantizers_are_the_qat_quantizers(name, scheme):
    quantizer = _build(QUANTIZER_YAML.format(component=f"{QUANTIZERS}.{name}") + "  groupsize: 32\n", "quantizer")
    assert type(quantizer) is QATQuantizer
    assert (quantizer.config.scheme, quantizer.config.group_size) == (scheme, 32)


QLORA_YAML = """
model:
  _component_: torchtune.models.llama3_2.qlora_llama3_2_1b
  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']
  apply_lora_to_mlp: True
  lora_rank: 64
  lora_alpha: 128
  lora_dropout: 0.0
"""


def test_qlora_builder_is_lora_with_an_nf4_base():
    with torch.device("meta"):
        model = _build(QLORA_YAML, "model")
    assert model.config.num_layers == 16 and model.weights_tied()
    assert isinstance(model.layers[0].mlp.up_proj, LoRALinear) and model.layers[0].attn.q_proj.scale == 2.0
    assert component_argument(OmegaConf.create(QLORA_YAML).model, "quantize_base") is True
    with pytest.raises(QattuneError) as err:  # nothing converted the base to NF4
        model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert str(err.value) == (
        "quantize_base=true (torchtune's qlora_* builders) trains LoRA over an NF4 base, but it was not converted; "
        "in recipe qat_lora set base_quantizer={_component_: qattune.quant.PTQQuantizer, scheme: nf4} and no "
        "quantizer, or use a lora_* builder with quantize_base: false")
    lora = QLORA_YAML.replace("qlora_llama3_2_1b", "lora_llama3_2_1b")
    assert component_argument(OmegaConf.create(lora).model, "quantize_base", False) is False
    assert _refusal(QLORA_YAML + "  quantize_base: False\n", "model") == (
        "quantize_base=false: this torchtune component means quantize_base=true; remove quantize_base, or use "
        "qattune.models.lora_llama3_2_1b")


@pytest.mark.parametrize("name, layers, dim, kv_heads, hidden, vocab, context, eps, tied", [
    ("qwen2_5_0_5b", 24, 896, 2, 4864, 151_936, 32_768, 1e-6, True),
    ("qwen2_5_1_5b_base", 28, 1536, 2, 8960, 151_936, 131_072, 1e-6, True),
    ("qwen2_5_1_5b_instruct", 28, 1536, 2, 8960, 151_936, 32_768, 1e-6, True),
    ("qwen2_5_7b_base", 28, 3584, 4, 18_944, 152_064, 131_072, 1e-6, False),
    ("qwen2_5_7b_instruct", 28, 3584, 4, 18_944, 152_064, 32_768, 1e-6, False),
    ("qwen2_5_14b_base", 48, 5120, 8, 13_824, 152_064, 131_072, 1e-5, False),
    ("qwen2_5_14b_instruct", 48, 5120, 8, 13_824, 152_064, 32_768, 1e-6, False),
])
def test_qwen2_5_builders_have_the_hugging_face_sizes(name, layers, dim, kv_heads, hidden, vocab, context, eps, tied):
    with torch.device("meta"):
        model = _build(f"model:\n  _component_: torchtune.models.qwen2_5.{name}\n", "model")
    config = model.config
    assert (config.num_layers, config.embed_dim, config.num_kv_heads, config.intermediate_dim) == (
        layers, dim, kv_heads, hidden)
    assert (config.vocab_size, config.max_seq_len, config.norm_eps, config.tie_embeddings) == (vocab, context, eps, tied)
    assert config.qkv_bias and config.rope_base == 1_000_000.0


UTILS_2024_YAML = """
output_dir: {out}
checkpointer:
  _component_: torchtune.utils.FullModelHFCheckpointer
  checkpoint_dir: {out}
  checkpoint_files: [model.safetensors]
  recipe_checkpoint: null
  output_dir: ${{output_dir}}
  model_type: LLAMA3_2
metric_logger:
  _component_: torchtune.utils.metric_logging.DiskLogger
  log_dir: ${{output_dir}}
profiler:
  _component_: torchtune.utils.setup_torch_profiler
  enabled: False
quantizer:
  _component_: torchtune.utils.quantization.Int8DynActInt4WeightQuantizer
  groupsize: 32
"""


def test_2024_torchtune_utils_paths(tmp_path):
    yaml = UTILS_2024_YAML.format(out=tmp_path)
    checkpointer = _build(yaml, "checkpointer")
    assert type(checkpointer).__name__ == "HFCheckpointer" and checkpointer.output_dir == tmp_path
    logger = _build(yaml, "metric_logger")
    logger.log({"loss": 1.5}, step=3)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.5
    assert type(_build(yaml, "profiler")).__name__ == "NoProfiler"
    quantizer = _build(yaml, "quantizer")
    assert (type(quantizer), quantizer.config.scheme, quantizer.config.group_size) == (PTQQuantizer, "8da4w", 32)


# ---------------------------------------------------------------- 3./4. arguments accepted with one value only

CHECKPOINTER_YAML = """
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {dir}
  checkpoint_files: [model-00001-of-00002.safetensors, model-00002-of-00002.safetensors]
  recipe_checkpoint: null
  output_dir: {dir}/out
  model_type: LLAMA3_2
"""
RESUME = "the top-level resume_from_checkpoint: true (output_dir's latest step_N) or a step_N folder"


def test_checkpointer_arguments_with_the_value_qattune_honours_are_accepted(tmp_path):
    yaml = CHECKPOINTER_YAML.format(dir=tmp_path) + (
        "  enable_dcp: False\n  safe_serialization: True\n  keep_last_n_checkpoints: null\n"
        "  should_load_recipe_state: False\n  adapter_checkpoint: null\n  resume_from_checkpoint: False\n")
    checkpointer = _build(yaml, "checkpointer")
    assert checkpointer.checkpoint_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert checkpointer.output_dir == tmp_path / "out"


@pytest.mark.parametrize("line, message", [
    ("enable_dcp: True", "enable_dcp=true: qattune does not write torch.distributed.checkpoint (DCP) folders: rank 0 "
                         "writes safetensors in the Hugging Face layout; remove enable_dcp"),
    ("keep_last_n_checkpoints: 2", "keep_last_n_checkpoints=2: qattune prunes step folders with the top-level "
                                   "keep_last_n_checkpoints; move it there"),
    ("safe_serialization: False", "safe_serialization=false: qattune always writes safetensors (torchtune's "
                                  "safe_serialization: true); remove safe_serialization"),
    ("should_load_recipe_state: True", f"should_load_recipe_state=true: to resume, set {RESUME}, and remove "
                                       "should_load_recipe_state"),
    ("adapter_checkpoint: adapter_0.pt", "adapter_checkpoint=adapter_0.pt: qattune resumes LoRA adapters from "
                                         f"adapter/ inside a step folder: set {RESUME}, and remove adapter_checkpoint"),
    ("resume_from_checkpoint: True", "resume_from_checkpoint=true: qattune's recipes read resume_from_checkpoint "
                                     "at the top level; move it there"),
])
def test_checkpointer_arguments_qattune_cannot_honour_are_refused(tmp_path, line, message):
    assert _refusal(CHECKPOINTER_YAML.format(dir=tmp_path) + f"  {line}\n", "checkpointer") == message


def test_recipe_checkpoint_is_refused_unless_null(tmp_path):
    yaml = CHECKPOINTER_YAML.format(dir=tmp_path).replace("recipe_checkpoint: null", "recipe_checkpoint: recipe_state.pt")
    assert _refusal(yaml, "checkpointer") == (
        f"recipe_checkpoint=recipe_state.pt: qattune resumes from the recipe_state.pt inside a step folder: set "
        f"{RESUME}, and remove recipe_checkpoint")


def test_a_value_not_known_yet_is_not_refused():
    alias = torchtune_alias("torchtune.training.FullModelHFCheckpointer")
    assert alias.refusals({"safe_serialization": object(), "enable_dcp": False}) == []
    assert [str(e) for e in alias.refusals({"enable_dcp": 0})][0].startswith("enable_dcp=0: ")  # 0 is not false


LR_YAML = """
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 4
"""


def test_lr_scheduler_last_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _build(LR_YAML + "  last_epoch: -1\n", "lr_scheduler", optimizer=optimizer, num_training_steps=10)
    assert schedule.last_epoch == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(1 / 5)  # step 0 of 4 warmup
    assert _refusal(LR_YAML + "  last_epoch: 5\n", "lr_scheduler", optimizer=optimizer, num_training_steps=10) == (
        "last_epoch=5: qattune restores the schedule's position from recipe_state.pt when it resumes "
        "(resume_from_checkpoint); remove last_epoch")


TOKENIZER_YAML = """
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: {path}
  max_seq_len: null
"""


@pytest.fixture
def byte_ranks(tmp_path):
    """A tiktoken ranks file with the 256 single bytes (enough for llama3_tokenizer to build)."""
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def test_tokenizer_prompt_template(byte_ranks):
    yaml = TOKENIZER_YAML.format(path=byte_ranks)
    tokenizer = _build(yaml + "  prompt_template: null\n  truncation_type: right\n", "tokenizer")
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert _refusal(yaml + "  prompt_template: torchtune.models.llama2.Llama2ChatTemplate\n", "tokenizer") == (
        "prompt_template=torchtune.models.llama2.Llama2ChatTemplate: qattune applies no torchtune prompt template: "
        "a conversation is laid out in the tokenizer's own chat format (qattune/tokenizers/chat_format.py), as "
        "torchtune's llama3_tokenizer does with prompt_template: null; remove prompt_template")


def test_llama2_tokenizer_accepts_only_the_template_qattune_applies():
    alias = torchtune_alias("torchtune.models.llama2.llama2_tokenizer")
    assert alias.translate({"path": "t.model", "prompt_template": "torchtune.models.llama2.Llama2ChatTemplate"}) == {
        "path": "t.model"}
    assert str(alias.refusals({"prompt_template": None})[0]) == (
        "prompt_template=null: qattune applies no torchtune prompt template: a conversation is laid out in the "
        "tokenizer's own chat format (qattune/tokenizers/chat_format.py), as torchtune's llama2_tokenizer does with "
        "prompt_template: torchtune.models.llama2.Llama2ChatTemplate; remove prompt_template")


def test_torchtune_profiler_and_tensorboard_keep_torchtunes_defaults(tmp_path):
    """setup_torch_profiler fills in wait 5, warmup 5, active 2 and record_shapes; TensorBoardLogger's
    organize_logs (default true) gives each run its own folder."""
    from qattune.config.aliases import TORCHTUNE_COMPONENTS

    profiler = TORCHTUNE_COMPONENTS["torchtune.training.setup_torch_profiler"]
    assert profiler.translate({"enabled": True, "active_steps": 3}) == {
        "enabled": True, "wait_steps": 5, "warmup_steps": 5, "active_steps": 3, "record_shapes": True}
    pytest.importorskip("tensorboard")
    logger = _build(f"metric_logger:\n  _component_: torchtune.training.metric_logging.TensorBoardLogger\n"
                    f"  log_dir: {tmp_path}\n", "metric_logger")
    assert os.path.dirname(logger.log_dir) == str(tmp_path) and os.path.basename(logger.log_dir).startswith("run_")
    flat = _build(f"metric_logger:\n  _component_: torchtune.training.metric_logging.TensorBoardLogger\n"
                  f"  log_dir: {tmp_path}\n  organize_logs: false\n", "metric_logger")
    assert flat.log_dir == str(tmp_path)


@pytest.mark.parametrize("name", ["alpaca_dataset", "alpaca_cleaned_dataset"])
def test_torchtune_alpaca_builders_mean_the_alpaca_prompt_as_a_chat(name):
    """torchtune sends the Alpaca prompt through the tokenizer's chat template (tests/data/test_data_alpaca_chat.py
    checks the ids); qattune's own builders keep the plain Alpaca text."""
    alias = torchtune_alias(f"torchtune.datasets.{name}")
    assert alias.translate({"train_on_input": False}) == {
        "train_on_input": False, "template": "alpaca_chat", "torchtune_layout": True}
    assert str(alias.refusals({"template": "alpaca"})[0]) == (
        f"template=alpaca: this torchtune component means template=alpaca_chat; remove template, or use "
        f"qattune.data.{name}")


@pytest.mark.parametrize("name, target", [("chat_dataset", "chat_dataset"), ("instruct_dataset", "input_output_dataset")])
def test_torchtune_chat_builders_mean_torchtunes_layout(name, target):
    """torchtune's chat_dataset and instruct_dataset mask whole messages and end with the eos (torchtune_layout;
    tests/data/test_data_torchtune_chat.py checks the ids); torchtune 0.6.1 has no masking_strategy, so only
    its absence (null) is accepted, and any value is refused in one line saying what to write instead."""
    alias = torchtune_alias(f"torchtune.datasets.{name}")
    assert alias.translate({"train_on_input": False, "masking_strategy": None}) == {
        "train_on_input": False, "torchtune_layout": True}
    assert str(alias.refusals({"torchtune_layout": False})[0]) == (
        f"torchtune_layout=false: this torchtune component means torchtune_layout=true; remove torchtune_layout, "
        f"or use qattune.data.{target}")
    yaml = (f"dataset:\n  _component_: torchtune.datasets.{name}\n  source: json\n  data_files: missing.json\n"
            "  masking_strategy: train_on_last\n")
    assert _refusal(yaml, "dataset", tokenizer=None) == (
        "masking_strategy=train_on_last: torchtune 0.6.1 (what qattune reproduces) has no masking_strategy; write "
        "train_on_input: true for train_on_all or false for train_on_assistant (train_on_last is not reproduced), "
        "and remove masking_strategy")
