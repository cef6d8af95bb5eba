"""The `qattune` verbs, run as a user would, with their outputs, files and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qattune.cli.main import main
from qattune.config.discovery import configs_dir, list_configs, list_recipes

FIXTURES = Path(__file__).parent / "fixtures"
SUM_RECIPE = FIXTURES / "sum_recipe.py"
RECIPES = ["eval", "full_finetune", "generate", "qat_distributed", "qat_lora", "quantize"]


def qattune(*args, env=None):
    """Run the real console entry point in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def run_main(capsys, *args):
    """Run `main` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_verb(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for verb in ("ls", "cp", "cat", "validate", "run"):
        assert f"    {verb} " in out


@pytest.mark.parametrize("verb", ["ls", "cp", "cat", "validate"])
def test_each_verb_has_help(capsys, verb):
    code, out, _ = run_main(capsys, verb, "--help")
    assert code == 0 and out.startswith(f"usage: qattune {verb}")


def test_run_help(capsys):
    code, out, _ = run_main(capsys, "run", "--help")
    assert code == 0 and out.startswith("usage: qattune run [torchrun options] RECIPE --config CONFIG")


def test_ls_shows_discovered_recipes_and_configs(capsys):
    code, out, _ = run_main(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    listed = [line.split()[0] for line in lines[1:] if not line.startswith(" ")]
    assert listed == RECIPES
    assert [r.name for r in list_recipes()] == RECIPES
    for config in list_configs():
        assert config.name in out


def test_every_shipped_config_names_a_known_recipe():
    configs = list_configs()
    assert configs, "no shipped configs found"
    for config in configs:
        assert config.recipe in RECIPES, f"{config.path} has no valid '# recipe:' header"


def test_cp_config_adds_suffix_and_refuses_overwrite(tmp_path, capsys):
    name = "tiny/full"
    code, out, _ = run_main(capsys, "cp", name, str(tmp_path / "mine"))
    assert code == 0
    copied = tmp_path / "mine.yaml"
    assert copied.read_text() == (configs_dir() / f"{name}.yaml").read_text()
    assert out.strip() == f"Copied {Path(name).name}.yaml to {copied}"
    code, _, err = run_main(capsys, "cp", name, str(copied))
    assert code == 2 and err.strip() == f"error: {copied} already exists; pass --force to overwrite it"
    copied.write_text("changed")
    assert run_main(capsys, "cp", name, str(copied), "--force")[0] == 0
    assert copied.read_text() != "changed"


def test_cp_recipe_into_folder_and_make_parents(tmp_path, capsys):
    code, _, _ = run_main(capsys, "cp", "qat_distributed", str(tmp_path))
    assert code == 0 and (tmp_path / "qat_distributed.py").is_file()
    target = tmp_path / "a" / "b" / "r.py"
    code, _, err = run_main(capsys, "cp", "eval", str(target))
    assert code == 2
    assert err.strip() == (f"error: cannot copy to {target}: folder {target.parent} does not exist "
                           "(add --make-parents to create it)")
    assert run_main(capsys, "cp", "eval", str(target), "--make-parents")[0] == 0
    assert "recipe_main(recipe, __file__)" in target.read_text()


def test_cp_bad_targets(tmp_path, capsys):
    name = "tiny/full"  # only a config (`eval` names both a config and a recipe)
    code, _, err = run_main(capsys, "cp", name, str(tmp_path / "x.py"))
    assert code == 2 and "it is a config (.yaml); give the destination that suffix" in err
    code, _, err = run_main(capsys, "cp", "qat_distributd", str(tmp_path / "x.py"))
    assert code == 2 and err.startswith("error: nothing to copy: 'qat_distributd' is neither a shipped config nor a "
                                        "recipe. Did you mean 'qat_distributed'?")


def test_cat_applies_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: /tmp/a\nlog: ${out}/logs\nlr: 1.0\n")
    code, out, _ = run_main(capsys, "cat", str(cfg), "lr=0.5", "+extra=[1,2]")
    assert code == 0
    assert out == "out: /tmp/a\nlog: ${out}/logs\nlr: 0.5\nextra:\n- 1\n- 2\n"
    code, out, _ = run_main(capsys, "cat", str(cfg), "--resolve", "out=/x")
    assert "log: /x/logs" in out


def test_validate_reports_all_problems_with_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"# recipe: {SUM_RECIPE}\noutput_dir: /tmp/o\nvalu: 2\n"
                   "optimizer:\n  _component_: torch.optim.AdamW\n  lrr: 0.1\n")
    code, out, err = qattune("validate", str(cfg), "--recipe", str(SUM_RECIPE))
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: 2 problems in config '{cfg}' for recipe 'sum_recipe':",
        "  valu: unknown key for recipe 'sum_recipe'. Did you mean 'value'?",
        "  optimizer.lrr: torch.optim.AdamW takes no argument 'lrr'. Did you mean 'lr'?",
    ]
    code, out, err = qattune("validate", str(cfg), "--recipe", str(SUM_RECIPE), "~valu", "optimizer.lrr=null",
                             "~optimizer.lrr", "+optimizer.lr=0.1")
    assert (code, err) == (0, "")
    assert out.strip() == f"Config '{cfg}' is valid for recipe 'sum_recipe'."


def test_validate_uses_the_config_header(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"# recipe: {SUM_RECIPE}\noutput_dir: /tmp/o\n")
    code, out, _ = run_main(capsys, "validate", str(cfg))
    assert code == 0 and "for recipe 'sum_recipe'" in out


def test_run_in_process(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: /tmp/unused\nvalue: 3\n")
    code, _, err = run_main(capsys, "run", str(SUM_RECIPE), "--config", str(cfg), f"output_dir={tmp_path}/o",
                            f"+points=[{{_component_: qt_fixture_components.Point, x: 7}}]")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "rank0.json").read_text()) == {"rank": 0, "world": 1, "total": 3.0,
                                                                       "points": [7]}


def test_run_through_torchrun_on_two_processes(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/o\nvalue: 5\n")
    code, out, err = qattune("run", "--nproc_per_node", "2", "--standalone", str(SUM_RECIPE), "--config", str(cfg),
                             env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err
    results = [json.loads((tmp_path / "o" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["total"]) for r in results] == [(0, 2, 15.0), (1, 2, 15.0)]


def test_run_validates_before_running(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/o\nvalue: 5\n")
    code, _, err = qattune("run", str(SUM_RECIPE), "--config", str(cfg), "value=five", "+bogus=1")
    assert code == 2
    assert err.splitlines() == [
        f"error: 2 problems in config '{cfg}' for recipe 'sum_recipe':",
        "  value: expected an int, got 'five'",
        "  bogus: unknown key for recipe 'sum_recipe'.",
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "qat_distribute", "--config", "x"],
         "error: unknown recipe 'qat_distribute'. Did you mean 'qat_distributed'? Valid recipes: eval, full_finetune, "
         "generate, qat_distributed, qat_lora, quantize (or a path to a .py file)"),
        (["run", "lora_finetune_single_device", "--config", "x"],
         "error: 'lora_finetune_single_device' is torchtune's recipe; qattune runs its configs with recipe 'qat_lora' "
         "(qattune run qat_lora --config ...), on one process or under torchrun alike"),
        (["run", "--nproc_per_node", "2", "full_finetune_distributed", "--config", "x"],
         "error: 'full_finetune_distributed' is torchtune's recipe; qattune runs its configs with recipe "
         "'full_finetune' (qattune run full_finetune --config ...), on one process or under torchrun alike"),
        (["run", "--config", "x"], "error: missing recipe: write `qattune run [torchrun options] RECIPE --config CONFIG` "
                                   "(see `qattune ls`)"),
        (["run", "/no/such/recipe.py", "--config", "x"], "error: recipe file not found: /no/such/recipe.py"),
        (["run", "--nproc_per_nod", "2", "eval", "--config", "eval"],
         "error: unknown torchrun option '--nproc_per_nod'. Did you mean '--nproc_per_node' or '--nproc-per-node'? "
         "See `torchrun --help`"),
        (["run", str(SUM_RECIPE)], "error: missing --config: name a shipped config (see `qattune ls`) or a YAML file"),
        (["run", str(SUM_RECIPE), "--config", "x.yaml"],
         "error: config file not found: x.yaml (check the path, or run `qattune ls` for shipped configs)"),
        (["validate", "no_such_config"],
         "error: unknown config 'no_such_config': neither a shipped config nor a file. Run `qattune ls` to list "
         "shipped configs"),
        (["cat", str(FIXTURES / "sum_recipe.py"), "value"],
         None),
    ],
)
def test_friendly_errors(capsys, args, message):
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert "Traceback" not in err
    if message is not None:
        assert err.strip() == message
    else:
        assert err.startswith("error: ")


def test_override_without_equals_is_reported(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("value: 1\n")
    code, _, err = run_main(capsys, "cat", str(cfg), "value")
    assert code == 2 and err.strip() == (
        "error: override 'value' has no '=': write key=value to change a key, +key=value to add one, ~key to delete one")


def test_bad_yaml_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a: 1\n  b: 2\n")
    code, _, err = run_main(capsys, "validate", str(cfg))
    assert code == 2 and err.startswith(f"error: cannot read YAML in {cfg}, line 2, column ")


def test_a_torchtune_config_validates_unchanged(capsys):
    config = FIXTURES / "torchtune_3B_qat_full.yaml"
    code, out, err = run_main(capsys, "validate", str(config), "--recipe", "qat_distributed")
    assert (code, err) == (0, "")
    assert out.strip() == f"Config '{config}' is valid for recipe 'qat_distributed'."


@pytest.mark.parametrize("launch, recipe", [
    ("tune run --nproc_per_node 2 qat_lora_finetune_distributed --config llama3_2/3B_qat_lora", "qat_lora"),
    ("tune run --nnodes 1 --nproc_per_node=4 full_finetune_distributed --config llama3_2/1B_full", "full_finetune"),
    ("tune run lora_finetune_single_device --config llama3_2/1B_lora_single_device", "qat_lora"),
    ("tune run qat_distributed --config llama3/8B_qat_full", "qat_distributed"),
    ("tune run knowledge_distillation_single_device --config qwen2/1.5_to_0.5B_KD_lora_single_device", None),
])
def test_a_torchtune_configs_tune_run_comment_names_the_recipe(tmp_path, launch, recipe):
    from qattune.config.discovery import config_recipe

    config = tmp_path / "c.yaml"
    config.write_text(f"# Config for ...\n#\n# To launch, run:\n#   {launch}\n#\noutput_dir: /tmp/x\n")
    assert config_recipe(config) == recipe
    config.write_text(f"# recipe: eval\n#   {launch}\n")
    assert config_recipe(config) == "eval"  # qattune's own header wins


def test_torchtune_components_build_qattune_objects(tmp_path):
    from omegaconf import OmegaConf

    from qattune.config import instantiate
    from qattune.quant import QATQuantizer
    from qattune.training import JSONLLogger

    cfg = OmegaConf.load(FIXTURES / "torchtune_3B_qat_full.yaml")
    quantizer = instantiate(cfg.quantizer)
    assert isinstance(quantizer, QATQuantizer)
    assert (quantizer.config.scheme, quantizer.config.group_size) == ("8da4w", 256)
    cfg.output_dir = str(tmp_path)
    assert isinstance(instantiate(cfg.metric_logger), JSONLLogger)


def test_a_copied_config_that_extends_another_still_validates(tmp_path, capsys):
    assert run_main(capsys, "cp", "tiny/qat_full", str(tmp_path / "mine.yaml"))[0] == 0
    code, out, err = run_main(capsys, "validate", str(tmp_path / "mine.yaml"))
    assert (code, err) == (0, "") and "valid for recipe 'qat_distributed'" in out


@pytest.mark.parametrize("config", [c.name for c in list_configs()])
def test_every_shipped_config_validates(capsys, config):
    code, out, err = run_main(capsys, "validate", config)
    assert (code, err) == (0, ""), err


def test_cat_resolve_names_each_unresolvable_key(capsys):
    code, out, err = run_main(capsys, "cat", "tiny/qat_full", "output_dir=${nope}", "--resolve")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "error: cannot resolve 2 values of config 'tiny/qat_full':",
        "  output_dir: cannot resolve its value: Interpolation key 'nope' not found",
        "  metric_logger.log_dir: cannot resolve its value: Interpolation key 'nope' not found",
    ]
    code, _, err = run_main(capsys, "cat", "tiny/qat_full", "output_dir=???", "--resolve")
    assert code == 2 and err.splitlines()[1:] == [
        "  output_dir: a value is required (the config has ???); set it with output_dir=...",
        "  metric_logger.log_dir: it refers to output_dir, which has no value (???)",
    ]
    assert run_main(capsys, "cat", "tiny/qat_full", "output_dir=???")[0] == 0  # printing unresolved is fine


def test_cat_sets_keys_the_header_recipe_reads(capsys):
    code, out, _ = run_main(capsys, "cat", "tiny/qat_full", "compile=true")
    assert code == 0 and out.endswith("compile: true\n")
    code, _, err = run_main(capsys, "cat", "tiny/qat_full", "compil=true")
    assert code == 2 and err.strip() == ("error: cannot override 'compil': neither the config nor its recipe has such "
                                         "a key. Did you mean 'compile'?")


@pytest.mark.parametrize("override", ["epochs=1,2", "epochs=range(1,3)", "epochs=choice(1,2)"])
def test_sweeps_are_one_line(capsys, override):
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", override)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[1].startswith(f"  override '{override}' is a sweep (")


def test_a_comma_in_a_run_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/o\n")
    code, _, err = run_main(capsys, "run", str(SUM_RECIPE), "--config", str(cfg), "+note=Tell me a joke, please")
    assert code == 2 and err.splitlines()[1] == (
        "  override '+note=Tell me a joke, please' is a sweep (a comma separates values), which qattune does not "
        "support; quote a value that contains a comma: \"+note='Tell me a joke, please'\"")


def test_cp_under_a_file_or_where_it_cannot_write(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("a: 1\n")
    for args in (["x.yaml/y.yaml"], ["x.yaml/z/y.yaml", "--make-parents"]):
        code, _, err = run_main(capsys, "cp", "tiny/qat_full", *args)
        assert (code, err.strip()) == (2, f"error: cannot copy to {args[0]}: x.yaml is a file, not a folder")
    code, _, err = run_main(capsys, "cp", "tiny/qat_full", "/proc/x.yaml", "--make-parents")
    assert code == 2 and err.startswith("error: cannot copy to /proc/x.yaml: ") and len(err.splitlines()) == 1


def test_validate_inherits_the_recipe_from_defaults(tmp_path, capsys):
    cfg = tmp_path / "v.yaml"
    cfg.write_text("defaults: [tiny/qat_full]\nbatchsize: 4\n")
    code, _, err = run_main(capsys, "validate", str(cfg))
    assert code == 2 and err.splitlines() == [
        f"error: 1 problem in config '{cfg}' for recipe 'qat_distributed':",
        "  batchsize: unknown key for recipe 'qat_distributed'. Did you mean 'batch_size' or 'batch_size_val'?",
    ]


def test_validate_without_any_recipe_checks_components_only(tmp_path, capsys):
    cfg = tmp_path / "n.yaml"
    cfg.write_text("batchsize: 4\noptimizer: {_component_: torch.optim.AdamW, lr: 0.1}\n")
    code, out, err = run_main(capsys, "validate", str(cfg))
    assert (code, err) == (0, "")  # no 'missing params': the recipe would pass them
    assert out.strip() == (f"Config '{cfg}' has valid components; no recipe is known, so its keys were not checked "
                           "(pass --recipe NAME, or give it a '# recipe: NAME' header).")
    code, _, err = run_main(capsys, "validate", str(cfg), "optimizer.lrr=1")
    assert code == 2 and err.splitlines()[0] == (
        f"error: 1 problem in config '{cfg}' (no recipe is known, so its keys were not checked: pass --recipe NAME):")


def test_validate_recipe_without_config_or_with_a_syntax_error(tmp_path, capsys):
    (tmp_path / "plain.py").write_text("print('hi')\n")
    (tmp_path / "broken.py").write_text("def (\n")
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", "--recipe", str(tmp_path / "plain.py"))
    assert code == 2 and err.startswith(f"error: recipe {tmp_path / 'plain.py'} declares no Config class")
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", "--recipe", str(tmp_path / "broken.py"))
    assert code == 2 and err.strip() == (f"error: recipe {tmp_path / 'broken.py'} has a syntax error at line 1: "
                                         "invalid syntax; fix the file")
    code, _, err = run_main(capsys, "run", str(tmp_path / "broken.py"), "--config", "tiny/qat_full")
    assert code == 2 and len(err.splitlines()) == 1 and "syntax error" in err


def test_torchrun_validates_in_the_launcher_before_importing_torch(tmp_path):
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the launcher imported torch')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/o\n")
    code, out, err = qattune("run", "--nproc_per_node", "2", str(SUM_RECIPE), "--config", str(cfg), "value=five",
                             env={"PYTHONPATH": str(fake.parent)})
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"error: 1 problem in config '{cfg}' for recipe 'sum_recipe':",
                                "  value: expected an int, got 'five'"]


def test_run_recipe_help_lists_its_keys(capsys):
    code, out, _ = run_main(capsys, "run", "qat_distributed", "--help")
    assert code == 0
    assert out.startswith("usage: qattune run [torchrun options] qat_distributed --config CONFIG [overrides ...]\n")
    assert "tiny/qat_full" in out and "\n  quantizer*" in out and "\n  epochs " in out
    code, out, _ = run_main(capsys, "run", str(SUM_RECIPE), "--config", "x", "-h")
    assert code == 0 and "\n  offload " in out and "must be false (sum_recipe keeps everything on the host" in out
    assert 'must be null or "sum" (sum_recipe only sums; remove the key)' in out


def test_verb_usage_errors(capsys):
    code, out, err = run_main(capsys, "run")
    assert (code, out) == (2, "") and err.startswith("usage: qattune run [torchrun options] RECIPE")
    code, _, err = run_main(capsys, "cat")
    assert code == 2 and err.splitlines()[-1] == "qattune cat: error: the following arguments are required: config"
    code, _, err = run_main(capsys, "cat", "tiny/qat_full", "--foo")
    assert code == 2 and err.splitlines() == ["usage: qattune cat [-h] [--resolve] config [overrides ...]",
                                              "qattune cat: error: unrecognized arguments: --foo"]


def test_bad_overrides_and_bad_values_are_reported_together(capsys):
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", "epochs=two", "bogus_key=1", "device=gpu")
    assert code == 2 and err.splitlines() == [
        "error: 3 problems in config 'tiny/qat_full' for recipe 'qat_distributed':",
        "  cannot override 'bogus_key': neither the config nor its recipe has such a key.",
        "  epochs: expected an int, got 'two'",
        "  device: expected a device such as cpu, cuda, cuda:N (N a GPU index), mps or xpu, got 'gpu'",
    ]


def test_unsupported_keys_are_refused_by_validate_as_by_run(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/o\n")
    expected = ["  offload=true is not supported: sum_recipe keeps everything on the host; set offload=false"]
    code, _, err = run_main(capsys, "validate", str(cfg), "--recipe", str(SUM_RECIPE), "offload=true")
    assert code == 2 and err.splitlines()[1:] == expected
    code, _, err = run_main(capsys, "run", str(SUM_RECIPE), "--config", str(cfg), "offload=true")
    assert code == 2 and err.splitlines()[1:] == expected


def test_custom_keys_belong_in_a_copied_recipes_config(tmp_path, capsys):
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", "+custom=3")
    assert code == 2 and err.splitlines()[1] == "  custom: unknown key for recipe 'qat_distributed'."
    recipe = tmp_path / "my_recipe.py"
    assert run_main(capsys, "cp", "qat_distributed", str(recipe))[0] == 0
    recipe.write_text(recipe.read_text().replace("class Config(TrainingConfig):\n",
                                                 "class Config(TrainingConfig):\n    custom: int = 0\n"))
    for override in ("custom=3", "+custom=3"):
        code, out, err = run_main(capsys, "validate", "tiny/qat_full", "--recipe", str(recipe), override)
        assert (code, err) == (0, ""), err
    code, _, err = run_main(capsys, "validate", "tiny/qat_full", "--recipe", str(recipe), "custom=three")
    assert code == 2 and err.splitlines()[1] == "  custom: expected an int, got 'three'"


def test_ctrl_c_is_one_line_pointing_at_resume(tmp_path, capsys, monkeypatch):
    from qattune.config import recipe_main

    def interrupted(cfg):
        raise KeyboardInterrupt

    def interrupt(recipe_file):
        with pytest.raises(SystemExit) as exit_:
            recipe_main(interrupted, str(recipe_file), ["--config", str(cfg)])
        return exit_.value.code, capsys.readouterr().err

    monkeypatch.delenv("RANK", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\n")
    stop_recipe = FIXTURES / "stop_recipe.py"  # a training recipe: it reads resume_from_checkpoint
    assert interrupt(stop_recipe) == (130, f"interrupted: no checkpoint was written to {tmp_path} yet, so there is "
                                           "nothing to resume: run again to start over\n")
    (tmp_path / "step_3").mkdir()
    assert interrupt(stop_recipe) == (130, "interrupted: checkpoints are written whole or not at all; "
                                           f"resume_from_checkpoint=true continues from the latest, {tmp_path}/step_3\n")
    assert interrupt(SUM_RECIPE) == (130, "interrupted: the run stopped before it finished\n")
