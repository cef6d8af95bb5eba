"""`qattune demo` refuses what would fail only after its fine-tunes, before it starts them."""

import subprocess
import sys


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qattune.cli.main", "demo", *args], capture_output=True, text=True,
                          timeout=120)


def test_no_evaluation_documents_is_refused_up_front(tmp_path):
    proc = demo("--eval-documents", "0", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: --eval-documents 0: the evaluation needs at least 1 document"
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_written_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = demo("--output-dir", str(tmp_path / "file" / "out"))
    assert proc.returncode == 2 and "===" not in proc.stdout
    assert proc.stderr.strip() == (f"error: --output-dir={tmp_path}/file/out cannot be written (Not a directory: "
                                   f"{tmp_path}/file/out); set --output-dir to a folder you can write")
