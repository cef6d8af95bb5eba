"""Load rows of a dataset from a local file or folder, or from the Hugging Face hub when online."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from qattune.errors import QattuneError

_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

Rows = Sequence[dict[str, Any]]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in _BUILDER_BY_SUFFIX


def _hub_offline() -> bool:
    return any(os.environ.get(var, "0").lower() in ("1", "true", "yes") for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_rows(
    source: str, split: str = "train", text_sample_by: str = "paragraph", data_files: Optional[str] = None
) -> Rows:
    """Rows (dicts) of `source`: a .txt/.md/.rst, .json/.jsonl, .parquet or .csv file, a folder, or a hub name.

    Text files give one row per line, paragraph (blank-line separated) or whole document
    (`text_sample_by`), in a column named `text`. A local file has one split, `train`; take slices with
    `datasets` syntax such as `train[:90%]`. torchtune's spelling also works: `source` a builder name
    (json, text, parquet, csv) and `data_files` the local file.
    """
    if data_files is not None:
        if not os.path.exists(os.path.expanduser(data_files)):
            raise QattuneError(f"dataset file '{data_files}' (data_files) does not exist; check the path "
                               f"(relative paths start from {os.getcwd()})")
        extra = {"sample_by": text_sample_by} if source == "text" else {}
        return _load(data_files, split, source, data_files=os.path.expanduser(data_files), **extra)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        builder = _BUILDER_BY_SUFFIX.get(suffix)
        if builder is None:
            raise QattuneError(
                f"dataset file '{source}' has an unknown type '{suffix}'; use one of {sorted(_BUILDER_BY_SUFFIX)}"
            )
        extra = {"sample_by": text_sample_by} if builder == "text" else {}
        return _load(source, split, builder, data_files=path, **extra)
    if os.path.isdir(path):
        return _load(source, split, path)
    if _looks_like_path(source):
        raise QattuneError(f"dataset file '{source}' does not exist; check the path (relative paths start from {os.getcwd()})")
    if _hub_offline():
        raise QattuneError(
            f"dataset '{source}' is not a local file and the Hugging Face hub is offline "
            "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set); pass a local file path instead"
        )
    return _load(source, split, source)


def _load(source: str, split: str, *args: Any, **kwargs: Any) -> Rows:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # qattune shows its own progress; keep the console quiet
    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise QattuneError(f"dataset '{source}' has no split '{split}' ({err}); a local file has only 'train'") from err
        raise
    except FileNotFoundError as err:
        raise QattuneError(f"dataset '{source}' could not be found ({err}); pass a local file path or check the name") from err
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def require_columns(rows: Rows, columns: Sequence[str], source: str) -> None:
    """Refuse, listing the available columns, when any of `columns` is missing."""
    available = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    missing = [c for c in columns if c not in available]
    if missing:
        raise QattuneError(
            f"dataset '{source}' has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are: {', '.join(available) or '(none)'}"
        )
