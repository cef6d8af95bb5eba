"""The generate recipe through the CLI: `prompts` replacing `prompt`, greedy text equal to in-process
decoding (an int4 model with a 260-token head too), and the refusals before the model loads."""

import pytest
import torch

from recipe_cli import BYTES, error_line, run_recipe, write_checkpoint
from qattune.checkpoint import load_model
from qattune.generation import generate_text
from qattune.tokenizers import byte_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_recipe")
    write_checkpoint(root / "float")
    write_checkpoint(root / "int4", scheme="4w", group_size=32)
    write_checkpoint(root / "small", vocab_size=200)
    return root


def generate(folder, *overrides, returncode=0):
    return run_recipe("generate", "--config", "generation", f"checkpoint_dir={folder}", BYTES, "chat=false",
                      "max_new_tokens=6", *overrides, returncode=returncode)


def greedy(folder, texts):
    with torch.no_grad():
        return generate_text(load_model(folder, keep_dequantized=True), byte_tokenizer(), texts, 6).texts


@pytest.mark.parametrize("folder", ["float", "int4"])
def test_prompts_replace_prompt_and_decode_as_in_process(folders, folder):
    proc = generate(folders / folder, "prompts=[abc,def g]")
    first, second = greedy(folders / folder, ["abc", "def g"])
    assert proc.stdout.startswith(f"> abc\n{first}\n\n> def g\n{second}\n\n")  # not the shipped prompt
    assert proc.stdout.count("> ") == 2 and "tokens/s" in proc.stdout.splitlines()[-1]


def test_top_k_and_top_p_without_temperature_print_one_warning(folders):
    proc = generate(folders / "float", "prompt=abc", "top_k=5", "top_p=0.9")
    assert "warning: top_k=5 and top_p=0.9 ignored: temperature=0 decodes greedily; set temperature > 0 to sample" \
        in proc.stderr.splitlines()
    assert proc.stdout.startswith(f"> abc\n{greedy(folders / 'float', ['abc'])[0]}\n")


@pytest.mark.parametrize("overrides, message", [
    (["prompt=''"], "prompt is empty; give a text to generate from"),
    (["prompts=[abc,'']"], "prompts[1] is empty; give a text to generate from"),
    (["prompts=[]"], 'nothing to generate from: set prompt="..." or prompts=[...]'),
    (["prompt=abc", "cuda_graph=true"],
     "cuda_graph=true replays CUDA graphs; device=cpu has none (set device=cuda, or cuda_graph=false)"),
])
def test_bad_options_are_one_line(folders, overrides, message):
    assert error_line("generate", "--config", "generation", f"checkpoint_dir={folders / 'float'}", BYTES,
                      *overrides) == message


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(folders):
    line = error_line("generate", "--config", "generation", f"checkpoint_dir={folders / 'small'}", BYTES, "prompt=hi")
    assert line == (f"tokenizer ids reach 259 but the model's vocab_size is 200 ({folders / 'small'}): "
                    "use the model's tokenizer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(folders):
    line = error_line("generate", "--config", "generation", f"checkpoint_dir={folders / 'float'}", BYTES,
                      "prompt=hi", "device=cuda")
    assert line == "device 'cuda' was requested but no CUDA GPU is visible; set device=cpu"


@pytest.mark.parametrize("overrides, system", [
    ([], None),
    (["system_prompt=''"], ""),  # an empty system message replaces a template's default one (HF, torchtune)
    (["system_prompt=Be brief."], "Be brief."),
    (["prompt={system: '', user: abc}"], ""),
    (["prompt={system: null, user: abc}", "system_prompt=Be brief."], "Be brief."),
])
def test_the_chat_prompt_holds_the_system_message_given(folders, monkeypatch, overrides, system):
    import qattune.generation
    from qattune.cli.main import main

    class Captured(Exception):
        pass

    prompts = []

    def capture(model, tokenizer, given, *args, **kwargs):
        prompts.extend(given)
        raise Captured

    monkeypatch.setattr(qattune.generation, "generate_text", capture)
    with pytest.raises(Captured):
        main(["run", "generate", "--config", "generation", f"checkpoint_dir={folders / 'float'}", BYTES, "chat=true",
              "prompt=abc", *overrides])
    expected = [] if system is None else [{"role": "system", "content": system}]
    assert prompts == [[*expected, {"role": "user", "content": "abc"}]]
