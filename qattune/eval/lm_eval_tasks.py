"""Run lm-evaluation-harness tasks on a qattune model: by name, or from local task directories (offline).

A local task is a directory (or YAML file) in lm-eval's task format; for offline use its data is a local
file: `dataset_path: json` with `dataset_kwargs: {data_files: {test: /path/data.jsonl}}`. lm-eval is
imported only when these functions run; without it they raise a QattuneError saying how to install it.
"""

from __future__ import annotations

import contextlib
import difflib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from qattune.errors import QattuneError

INSTALL_HINT = "pip install 'qattune[eval]' (or: pip install lm-eval)"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QattuneError(f"lm-eval tasks need the lm-eval package, which is not installed; {INSTALL_HINT}") from None


def lm_eval_model(
    model: nn.Module,
    tokenizer: Any,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    max_gen_toks: int = 256,
    add_bos: bool = True,
    prefix_token_id: Optional[int] = None,
) -> Any:
    """A `QattuneLM` (an `lm_eval.api.model.LM`) over `model` and `tokenizer`; see lm_eval_adapter."""
    _require_lm_eval()
    from qattune.eval.lm_eval_adapter import QattuneLM

    return QattuneLM(model, tokenizer, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks,
                     add_bos=add_bos, prefix_token_id=prefix_token_id)


@dataclass(frozen=True)
class LmEvalResults:
    """Per task: metric values, their standard errors (where lm-eval computed one) and directions.

    Metric names are lm-eval's without the default filter (`acc`, `word_perplexity`); a metric under
    another filter keeps it (`exact_match,strict-match`).
    """

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def flat(self) -> dict[str, float]:
        """`{"task/metric": value}` for side-by-side comparisons."""
        return {f"{task}/{name}": value for task, values in self.metrics.items() for name, value in values.items()}

    def flat_higher_is_better(self) -> dict[str, bool]:
        return {f"{task}/{name}": hib for task, values in self.higher_is_better.items() for name, hib in values.items()}


def _metric_name(key: str) -> str:
    name, _, filter_name = key.partition(",")
    return name if filter_name in ("", "none") else key


def _metric_entries(values: dict[str, Any], directions: dict[str, bool]) -> dict[str, float]:
    """The numeric `metric,filter` entries of one task's results (lm-eval's bookkeeping, such as
    `sample_len`, `name` or `alias`, is left out), keeping only metrics in the task's `directions`
    when it has any (their `_stderr` companions too)."""
    out = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        base = key.partition(",")[0].removesuffix("_stderr")
        if not directions or base in directions:
            out[key] = float(value)
    return out


def _collect(raw: dict[str, Any]) -> LmEvalResults:
    reported = {task: {name: bool(v) for name, v in values.items()}
                for task, values in raw.get("higher_is_better", {}).items()}
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    directions: dict[str, dict[str, bool]] = {}
    for task, values in raw.get("results", {}).items():
        known = reported.get(task, {})
        for key, value in _metric_entries(values, known).items():
            name, base = _metric_name(key), key.partition(",")[0]
            if base.endswith("_stderr"):
                stderr.setdefault(task, {})[name.replace("_stderr", "", 1)] = value
                continue
            metrics.setdefault(task, {})[name] = value
            if base in known:
                directions.setdefault(task, {})[name] = known[base]
    return LmEvalResults(metrics, stderr, directions, raw)


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records `git describe` of the working directory and lets git print `fatal: not a git
    repository` outside one; run that probe with git's stderr silenced."""
    import lm_eval.evaluator as evaluator

    def git_hash() -> Optional[str]:
        try:
            probe = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:  # no git
            return None
        return probe.stdout.strip() if probe.returncode == 0 and probe.stdout.strip() else None

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _task_manager(task_dirs: Sequence[str], include_default_tasks: bool) -> Any:
    from lm_eval.tasks import TaskManager

    for directory in task_dirs:
        if not Path(directory).exists():
            raise QattuneError(f"lm-eval task dir {directory} does not exist; give a directory or YAML file of tasks")
    return TaskManager(include_path=list(task_dirs) or None, include_defaults=include_default_tasks)


def _check_task_names(tasks: Sequence[str], manager: Any, task_dirs: Sequence[str]) -> None:
    known = set(manager.all_tasks)
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"task dirs {', '.join(task_dirs)}" if task_dirs else "no task dirs"
        raise QattuneError(f"lm-eval task {name!r} is unknown ({len(known)} known tasks, {where}); {hint}a hub task "
                           "needs its lm-eval name and network access, or add a local task dir with its YAML")


def check_tasks(tasks: Sequence[str], task_dirs: Sequence[str] = (), include_default_tasks: bool = True) -> Any:
    """Index the lm-eval tasks (lm-eval's own and those in `task_dirs`) and check every name in `tasks`;
    the `TaskManager` to pass to `run_lm_eval`. Cheap next to evaluating: call it before loading models."""
    _require_lm_eval()
    if not tasks:
        raise QattuneError("no lm-eval tasks given; name at least one lm-eval task")
    if task_dirs and include_default_tasks:
        local = _task_manager(task_dirs, include_default_tasks=False)
        if _all_plain_tasks(tasks, local):
            return local  # lm-eval's own ~13,000 task YAMLs take 10+ s to index, and none is needed
    manager = _task_manager(task_dirs, include_default_tasks)
    _check_task_names(tasks, manager, task_dirs)
    return manager


def _all_plain_tasks(tasks: Sequence[str], manager: Any) -> bool:
    """Whether every name in `tasks` is a task (not a group or tag, which may name lm-eval's own tasks)
    that `manager` indexed."""
    index = getattr(manager, "task_index", {})
    return all(name in index and _entry_kind(index[name]) == "task" for name in tasks)


def _entry_kind(entry: Any) -> str:
    """'task', 'group', 'tag', ...: an lm-eval index entry's kind (an enum since 0.4.10, a dict's "type" before)."""
    kind = entry.get("type") if isinstance(entry, dict) else getattr(entry, "kind", None)
    return str(getattr(kind, "name", kind)).lower()


def run_lm_eval(
    lm: Any,
    tasks: Sequence[str],
    task_dirs: Sequence[str] = (),
    include_default_tasks: bool = True,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    bootstrap_iters: int = 1000,
    apply_chat_template: bool = False,
    random_seed: int = 0,
    task_manager: Optional[Any] = None,
) -> LmEvalResults:
    """Evaluate `lm` (from `lm_eval_model`) on `tasks`: lm-eval task names, names of tasks in `task_dirs`,
    or paths to task YAML files. A task whose data must come from the network and is not cached is a
    QattuneError saying so. `limit`: at most this many documents per task (a fraction if < 1).
    `task_manager`: from `check_tasks` (already checked), else built and checked here."""
    _require_lm_eval()
    import lm_eval

    manager = task_manager if task_manager is not None else check_tasks(tasks, task_dirs, include_default_tasks)
    try:
        with _quiet_git_probe():
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                bootstrap_iters=bootstrap_iters, apply_chat_template=apply_chat_template, log_samples=False,
                random_seed=random_seed, numpy_random_seed=random_seed, torch_random_seed=random_seed,
                fewshot_random_seed=random_seed,
            )
    except ConnectionError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QattuneError(f"lm-eval tasks {', '.join(tasks)} need data from the network that is not cached "
                           f"({first}); connect to the network once, or use a local task dir "
                           "(dataset_path: json + data_files)") from None
    except FileNotFoundError as err:
        raise QattuneError(f"lm-eval tasks {', '.join(tasks)}: a data file was not found ({err}); check "
                           "data_files in the task YAML (paths are relative to the working directory)") from None
    return _collect(raw or {})
