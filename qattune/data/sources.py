"""Load rows of a dataset from a local file or folder, or from the Hugging Face hub when online.

This is the boundary where user data is read: every way a file or the hub can fail becomes one
`QattuneError` line that names the file (or hub name), says what is wrong and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import urlsplit

from qattune.config.suggest import did_you_mean
from qattune.errors import QattuneError

BUILDERS = ("csv", "json", "parquet", "text")
"""The `datasets` builder names `source` may be when `data_files` names the file(s)."""

_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_SAMPLE_BY = ("line", "paragraph", "document")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")

Rows = Sequence[dict[str, Any]]
DataFiles = Union[str, Sequence[str], None]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in _BUILDER_BY_SUFFIX


def _hub_offline() -> bool:
    """Whether `datasets` works offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, read when it is imported)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _file_list(data_files: DataFiles) -> list[str]:
    """`data_files` (one path or a list of paths) as a list of paths; refuse anything else."""
    files = [data_files] if isinstance(data_files, str) else data_files
    if not isinstance(files, (list, tuple)) or not files or not all(isinstance(f, str) for f in files):
        raise QattuneError(f"data_files must be a file path or a list of file paths, got {data_files!r}")
    return list(files)


def dataset_label(source: str, data_files: DataFiles = None) -> str:
    """How messages name a dataset: its file(s) when `data_files` is given, else `source`."""
    if data_files is None:
        return source
    files = _file_list(data_files)
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"


def _root_cause(err: BaseException) -> str:
    """'Type: first line' of the deepest explicit cause of `err` (what actually went wrong)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _check_files(files: list[str], what: str) -> None:
    """Each file must exist and hold something."""
    for path in files:
        full = os.path.expanduser(path)
        if not os.path.exists(full):
            raise QattuneError(f"dataset file '{path}'{what} does not exist; check the path "
                               f"(relative paths start from {os.getcwd()})")
        if os.path.isfile(full) and os.path.getsize(full) == 0:
            raise QattuneError(f"dataset file '{path}'{what} is empty; put rows in it or name another file")


def load_rows(
    source: str,
    split: str = "train",
    text_sample_by: Optional[str] = None,
    data_files: DataFiles = None,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    filter_fn: Optional[Callable[[dict[str, Any]], bool]] = None,
) -> Rows:
    """Rows (dicts) of `source`: a .txt/.md/.rst, .json/.jsonl, .parquet or .csv file, a folder, or a hub name.

    torchtune's (and `datasets`') spelling also works: `source` a builder name (json, text, parquet,
    csv) and `data_files` the local file or a list of files. Text gives one row per line, paragraph
    (blank-line separated) or whole document (`text_sample_by`) in a column `text`; by default per line
    for `source: text` (as `datasets` and torchtune) and per paragraph for a text file path. A local
    file has one split, `train`; take slices with `datasets` syntax such as `train[:90%]`. `name` and
    `data_dir` go to `datasets.load_dataset`; `filter_fn(row)` keeps the rows it returns true for.
    """
    if text_sample_by is not None and text_sample_by not in _SAMPLE_BY:
        raise QattuneError(f"text_sample_by={text_sample_by!r} is not one of {', '.join(_SAMPLE_BY)}")
    extra = {key: value for key, value in (("name", name), ("data_dir", data_dir)) if value is not None}
    if data_files is not None or source in BUILDERS:
        rows = _load_with_builder(source, split, data_files, text_sample_by or "line", extra)
    else:
        rows = _load_path_or_hub(source, split, text_sample_by or "paragraph", extra)
    return rows if filter_fn is None else filter_rows(rows, filter_fn, dataset_label(source, data_files))


def _text_options(builder: str, sample_by: str) -> dict[str, str]:
    """The text builder's `sample_by` (line, paragraph or document); nothing for the other builders."""
    return {"sample_by": sample_by} if builder == "text" else {}


def _load_with_builder(source: str, split: str, data_files: DataFiles, sample_by: str, extra: dict) -> Rows:
    """torchtune's spelling: `source` a builder name, the file(s) in `data_files` (or `data_dir`)."""
    if source not in BUILDERS:
        raise QattuneError(f"dataset source '{source}' with data_files must be a file type, one of "
                           f"{', '.join(BUILDERS)} (json reads .json and .jsonl).{did_you_mean(source, BUILDERS)}")
    text = _text_options(source, sample_by)
    if data_files is None:
        if "data_dir" not in extra:
            raise QattuneError(f"dataset source '{source}' is a file type; name the file with data_files=PATH "
                               "(or give the file's path as source)")
        return _load(f"dataset folder '{extra['data_dir']}'", split, [], source, **text, **extra)
    files = _file_list(data_files)
    _check_files(files, " (data_files)")
    what = f"dataset file '{files[0]}'" if len(files) == 1 else f"one of dataset files {', '.join(files)}"
    expanded = [os.path.expanduser(f) for f in files]
    return _load(what, split, expanded, source, data_files=expanded, **text, **extra)


def _load_path_or_hub(source: str, split: str, sample_by: str, extra: dict) -> Rows:
    """`source` a local file (its type from its suffix), a local folder, or a hub dataset name."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        builder = _BUILDER_BY_SUFFIX.get(suffix)
        if builder is None:
            raise QattuneError(
                f"dataset file '{source}' has an unknown type '{suffix}'; use one of {sorted(_BUILDER_BY_SUFFIX)}, "
                "or set source to a file type (json, text, csv, parquet) and data_files to the file"
            )
        _check_files([source], "")
        text = _text_options(builder, sample_by)
        return _load(f"dataset file '{source}'", split, [path], builder, data_files=path, **text, **extra)
    if os.path.isdir(path):
        return _load(f"dataset folder '{source}'", split, [], path, **extra)
    if _looks_like_path(source):
        raise QattuneError(f"dataset file '{source}' does not exist; check the path (relative paths start from {os.getcwd()})")
    if not _hub_offline():
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise QattuneError(_hub_unreachable_message(f"dataset '{source}'", reason))
    return _load(f"dataset '{source}'", split, [], source, **extra)


def _hub_unreachable_reason() -> Optional[str]:
    """Why the hub's host cannot be reached (no name resolution, no connection within 5 s), or None.

    A quick check before `datasets` tries (it retries for about half a minute); skipped behind a proxy,
    where only the proxy can tell.
    """
    import datasets

    if any(os.environ.get(var) for var in _PROXY_VARS):
        return None
    url = urlsplit(datasets.config.HF_ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as err:
        return f"{url.hostname}: {err}"
    return None


def _hub_unreachable_message(what: str, reason: str) -> str:
    return (f"{what} is not a local file and the Hugging Face hub could not be reached ({reason}); "
            "pass a local file (e.g. source=data.jsonl), or set HF_DATASETS_OFFLINE=1 to use a copy in the local cache")


def _load(what: str, split: str, files: list[str], *args: Any, **kwargs: Any) -> Rows:
    """`datasets.load_dataset(*args, split=split, **kwargs)` with every failure as one line naming `what`."""
    import datasets
    import pyarrow

    was_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()  # qattune shows its own progress; keep the console quiet
    datasets.logging.set_verbosity(logging.CRITICAL)  # its "failed to read" logs precede the error below
    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    # what reading a file or the hub raises (pandas' and pyarrow's parse errors are ValueErrors)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError, StopIteration,
            EOFError) as err:
        raise QattuneError(_load_failure(what, split, files, args[0], err)) from err
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()


def _load_failure(what: str, split: str, files: list[str], builder: str, err: Exception) -> str:
    """The one-line message for a failed `load_dataset`."""
    cause = _root_cause(err)
    if isinstance(err, ValueError) and "Unknown split" in str(err):
        return f"{what} has no split '{split}' ({cause}); a local file has only 'train' (slice it: train[:90%])"
    if isinstance(err, ValueError) and "corresponds to no data" in str(err):
        return f"{what} holds no rows for split '{split}' ([] and {{}} rows count as none); put data in it or check the split"
    if isinstance(err, ConnectionError):
        if _hub_offline():
            return (f"{what} is not a local file and the Hugging Face hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                    "set), with no copy in the local cache; pass a local file path instead")
        return _hub_unreachable_message(what, cause)
    if isinstance(err, FileNotFoundError):
        return f"{what} could not be found ({cause}); pass a local file path or check the name"
    if builder == "json":
        for path in files:
            problem = json_lines_problem(path)
            if problem is not None:
                return f"dataset file '{path}' {problem}; fix the file"
    if isinstance(err, StopIteration):  # `datasets` found no row to infer a schema from
        return f"{what} holds no rows; put rows in it or name another source"
    kind = f" as {builder}" if builder in BUILDERS else ""
    return f"{what} could not be read{kind} ({cause}); check that the file is valid {builder or 'data'}"


def json_lines_problem(path: str) -> Optional[str]:
    """Where a JSON Lines (or JSON) file stops being readable, e.g. "line 2 is not valid JSON (...)";
    None when every line is a JSON object (or the whole file is one JSON document)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte {err.start + 1}: {err.reason})"
            except json.JSONDecodeError as err:
                return _whole_document_problem(path) if number == 1 else \
                    f"line {number} is not valid JSON ({err.msg}: column {err.colno})"
            if not isinstance(value, dict):
                return f"line {number} holds a JSON {type(value).__name__}, not an object such as {{\"text\": ...}}"
    return None


def _whole_document_problem(path: str) -> Optional[str]:
    """The first line is not JSON on its own: the file may be one (pretty-printed) JSON document."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        try:
            json.load(handle)
        except json.JSONDecodeError as err:
            return f"line {err.lineno} is not valid JSON ({err.msg}: column {err.colno})"
    return None


def filter_rows(rows: Any, filter_fn: Callable[[dict[str, Any]], bool], label: str) -> Rows:
    """The rows `filter_fn(row)` is true for (torchtune's `filter_fn`, applied to the raw rows)."""
    if not callable(filter_fn):
        raise QattuneError(f"dataset '{label}': filter_fn must be a function (a _component_ with _partial_: true), "
                           f"got {type(filter_fn).__name__}")
    keep = []
    for index, row in enumerate(rows):
        try:
            if filter_fn(row):
                keep.append(index)
        except Exception as err:  # noqa: BLE001 - the user's function failing on the user's data
            raise QattuneError(f"dataset '{label}' row {index}: filter_fn raised {_root_cause(err)}; "
                               "fix the function or the row") from err
    if not keep:
        raise QattuneError(f"dataset '{label}': filter_fn keeps none of its {len(rows)} rows; check the function")
    return rows.select(keep)


def require_columns(rows: Rows, columns: Sequence[str], source: str) -> None:
    """Refuse, listing the available columns, when any of `columns` is missing."""
    available = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    missing = [c for c in columns if c not in available]
    if missing:
        raise QattuneError(
            f"dataset '{source}' has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are: {', '.join(available) or '(none)'}"
        )
