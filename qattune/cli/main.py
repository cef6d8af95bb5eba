"""`qattune` command line: argument parsing and dispatch only.

Nothing heavy is imported here; each verb imports what it needs when it runs, so `qattune --help`,
`qattune ls` and `qattune validate` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from qattune import __version__
from qattune.errors import QattuneError, report_and_exit

DESCRIPTION = """\
qattune: fine-tune LLMs with quantization-aware training (QAT), convert them to real quantized
models, evaluate them against post-training quantization, and generate with them."""

EPILOG = """\
examples:
  qattune ls
  qattune cp llama3_2/3B_qat_lora my.yaml
  qattune cat tiny/qat_full optimizer.lr=1e-3
  qattune validate my.yaml
  qattune demo
  qattune run qat_distributed --config llama3_2/1B_qat_full
  qattune run --nproc_per_node 8 qat_distributed --config llama3/8B_qat_full

overrides (hydra grammar): a.b=v  a.b=[1,2]  +new.key=v  ++a.b=v  ~a.b  model=pkg.builder
run `qattune <verb> --help` for each verb."""

RUN_USAGE = """\
usage: qattune run [torchrun options] RECIPE --config CONFIG [overrides ...]

Run a recipe (a shipped name from `qattune ls`, or a path to a .py recipe script) with a config
(a shipped name or a YAML path) and hydra-style overrides.

With no torchrun options the recipe runs in this process (one device). With torchrun options
(--nproc_per_node, --nnodes, --node_rank, --rdzv_endpoint, --rdzv_backend, --rdzv_id, --master_addr,
--master_port, --standalone, ...) it is launched through torch.distributed.run with the same recipe
and config on every process; each distinct error of the processes is printed once.

Several nodes: run the same command on every node. --rdzv_endpoint HOST:PORT (HOST: one of the nodes)
is where they meet; with it and no --rdzv_backend, qattune uses --rdzv_backend c10d and --rdzv_id qattune
(torchrun's own default, static, would need a different --node_rank on each node). A launcher waits
for the other nodes up to the rendezvous timeout (--rdzv_conf join_timeout=SECONDS, default 600).
output_dir must be on a filesystem every node shares.

overrides: a.b=v (change)  +a.b=v (add)  ++a.b=v (add or change)  ~a.b (delete)
           model=qattune.models.llama3_2_1b (same as model._component_=...)
           a value with a comma is quoted: "prompt='Hello, world'" (a bare comma would be a sweep)
`qattune run RECIPE --help` lists the keys RECIPE reads.

examples:
  qattune run qat_distributed --config tiny/qat_full max_steps_per_epoch=10
  qattune run --nproc_per_node 2 qat_distributed --config tiny/qat_full
  qattune run --nnodes 2 --nproc_per_node 8 --rdzv_endpoint node0:29500 qat_distributed --config ...
  qattune run ./my_recipe.py --config my.yaml"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qattune", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"qattune {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    ls = verbs.add_parser("ls", help="list recipes and the configs shipped for each")
    ls.add_argument("-v", "--verbose", action="store_true", help="also describe each recipe")

    cp = verbs.add_parser("cp", help="copy a shipped config or recipe script to a file to edit")
    cp.add_argument("name", help="a shipped config name (e.g. llama3_2/3B_qat_lora) or recipe name")
    cp.add_argument("destination", help="file or existing folder; .yaml / .py is added when missing")
    cp.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    cp.add_argument("--make-parents", action="store_true", help="create missing parent folders")

    cat = verbs.add_parser("cat", help="print a config with overrides applied")
    cat.add_argument("config", help="a shipped config name or a YAML path")
    cat.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    cat.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")

    validate = verbs.add_parser("validate", help="check a config and overrides without running anything")
    validate.add_argument("config", help="a shipped config name or a YAML path")
    validate.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    validate.add_argument("--recipe", help="recipe to check against (default: the config's `# recipe:` header)")

    verbs.add_parser("run", help="run a recipe, in-process or through torchrun", add_help=False)

    demo = verbs.add_parser("demo", help="QAT vs PTQ on SmolLM2-135M end to end, offline (a few minutes on a CPU)")
    demo.add_argument("--output-dir", default="/tmp/qattune/demo", help="where every stage writes (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=24, help="optimizer steps of each fine-tune (default: %(default)s)")
    demo.add_argument("--eval-documents", type=int, default=2,
                      help="held-out documentation topics to evaluate on (default: %(default)s)")
    for verb_parser in (ls, cp, cat, validate, demo):
        verb_parser.set_defaults(verb_parser=verb_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "run":
            from qattune.cli.run import run_command
            from qattune.cli.torchrun_options import asks_for_help

            rest = argv[1:]
            if not rest:
                print(RUN_USAGE, file=sys.stderr)
                sys.exit(2)
            if asks_for_help(rest):
                print(RUN_USAGE)
                return
            run_command(rest)
            return
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        # Overrides may come after flags (`qattune cat cfg --resolve a=1`); anything else unknown is an error,
        # shown with the verb's own usage.
        if extra and getattr(args, "overrides", None) is not None and not any(e.startswith("-") for e in extra):
            args.overrides += extra
        elif extra:
            getattr(args, "verb_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if args.verb is None:
            _parser().print_help()
            return
        from qattune.cli import commands

        getattr(commands, f"{args.verb}_command")(args)
    except QattuneError as err:
        report_and_exit(err)
    except BrokenPipeError:  # `qattune ls | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
