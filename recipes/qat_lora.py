"""Quantization-aware LoRA fine-tuning on a fake-quantized (or truly quantized) frozen base.

    qattune run qat_lora --config llama3_2/1B_qat_lora
    qattune run --nproc_per_node 2 qat_lora --config llama3_2/3B_qat_lora

`model` is a LoRA builder (e.g. `qattune.models.lora_llama3_2_1b`). The frozen base is loaded from the
checkpoint, then either fake-quantized by `quantizer` (QAT: the adapters learn to correct the
quantization error the served model will have) or quantized for real by `base_quantizer` (QLoRA with
scheme nf4, to save memory; a `qlora_*` model builder, as torchtune's, implies it); then the adapters
are added. Each checkpoint holds the merged float model in the Hugging Face layout and the adapter alone,
PEFT-compatible, in `adapter/` (`save_adapter_weights_only: true`: the adapter alone, as torchtune does;
`quantize` needs the merged model). A QAT run's merged model is quantized with the scheme it trained
for; a QLoRA run's (nf4 is only the base's training-memory format) with any scheme.
"""

from typing import Optional

from qattune.config import Component, recipe_main
from qattune.training.session import TrainingConfig

ADAPTER_DIR = "adapter"


class Config(TrainingConfig):
    quantizer: Optional[Component] = None  # fake-quantizes the frozen base during training
    base_quantizer: Optional[Component] = None  # converts the frozen base to real quantized weights
    fake_quant_after_n_steps: Optional[int] = None
    save_adapter_weights_only: bool = False  # checkpoints hold the adapter and recipe state, not the merged model


def recipe(cfg) -> None:
    import copy
    from pathlib import Path

    from qattune.checkpoint import load_peft_adapter, write_peft_adapter
    from qattune.config import instantiate
    from qattune.config.aliases import component_argument
    from qattune.errors import QattuneError
    from qattune.models import apply_lora, merged_state_dict, split_lora
    from qattune.training import FakeQuantAfterNSteps
    from qattune.training.session import TrainingSession

    base_quantizer_cfg = cfg.base_quantizer
    if base_quantizer_cfg is None and component_argument(cfg.model, "quantize_base", False):
        base_quantizer_cfg = {"_component_": "qattune.quant.PTQQuantizer", "scheme": "nf4"}  # torchtune's qlora_*
    if cfg.quantizer is not None and base_quantizer_cfg is not None:
        raise QattuneError("set either quantizer (QAT of the frozen base) or base_quantizer (QLoRA), not both")
    quantizer = instantiate(cfg.quantizer) if cfg.quantizer is not None else None
    if getattr(getattr(quantizer, "config", None), "range_learning", False):  # (GPTQ rounding needs it too)
        raise QattuneError("quantizer.range_learning=true trains the base model's quantization, which qat_lora keeps "
                           "frozen (only the adapters train): remove it, or train the whole model with qat_distributed")
    lora = {}

    def base_builder():
        base, lora_config = split_lora(instantiate(cfg.model))
        lora.update(lora_config.to_dict())
        return base

    # QLoRA quantizes the base for real before sharding, so every rank needs its weights
    session = TrainingSession(cfg, model_builder=base_builder, weights_from_resume=False,
                              load_on_rank0_only=base_quantizer_cfg is None)
    try:
        hooks = []
        if quantizer is not None:
            quantizer.prepare(session.model)
            session.record_quantizer(quantizer)
            hooks.append(FakeQuantAfterNSteps(quantizer, session.model, cfg.fake_quant_after_n_steps))
        elif base_quantizer_cfg is not None:
            base_quantizer = instantiate(base_quantizer_cfg)
            base_quantizer.convert(session.model)
            session.record_quantizer(base_quantizer, key="base_quantizer")
        apply_lora(session.model, **lora)
        if session.resume_dir is not None:
            load_peft_adapter(session.model, Path(session.resume_dir) / ADAPTER_DIR)
        # FSDP shards the trained model: before each save every rank helps gather it into an unsharded
        # replica on rank 0, which the merged model and the adapter are written from.
        trained = session.model
        if session.dist.is_distributed:
            trained = copy.deepcopy(session.model).to("meta")

            def gather_replica():
                full = session.float_state_dict()  # collective: every rank takes part
                if session.dist.is_main:
                    trained.load_state_dict(full, assign=True)

            session.before_save.append(gather_replica)
        session.state_dict_fn = lambda: merged_state_dict(trained) if session.dist.is_main else {}
        session.save_model_weights = not cfg.save_adapter_weights_only
        # PEFT's AutoPeftModel loads the base from here (a Hugging Face folder; other sources have none)
        source = session.checkpointer
        base_path = str(Path(source.checkpoint_dir).absolute()) if getattr(source, "format", None) == "hf" else None
        session.extra_writers.append(
            lambda out: write_peft_adapter(trained, out / ADAPTER_DIR, base_model_name_or_path=base_path))
        session.extra_info["lora"] = lora
        session.build_trainer(step_hooks=hooks)
        session.train()
    finally:
        session.close()


if __name__ == "__main__":
    recipe_main(recipe, __file__)
