"""`mpk embed`, run in-process through mpk.cli.main, on the real all-MiniLM-L6-v2 (the
default model) and on a tiny random encoder passed as MODEL_DIR.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fixtures_bert import SENTENCES, TINY_MAX_SEQ_LENGTH, cosines, make_bert_checkpoint, minilm_dir, transformers_embeddings
from fixtures_models import single_torch_thread  # noqa: F401 (fixture)
from mpk.cli import main

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, match: str) -> None:
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert match in err, err


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_checkpoint(tmp_path_factory.mktemp("tiny-bert"), seed=5)


def test_default_model_json_lines_with_verify(capsys) -> None:
    sentences = ["Hello world", "", "Grüße aus Köln ☕"]
    code, out, err = run(capsys, "embed", *sentences, "--verify")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["sentence"] for r in records] == sentences
    embeddings = np.array([r["embedding"] for r in records], dtype=np.float64)
    assert embeddings.shape == (3, 384)
    reference = transformers_embeddings(minilm_dir(), sentences, 256)
    assert float(cosines(embeddings, reference).min()) >= 0.99999
    assert "verify: OK" in err
    assert "sentences/s" in err


def test_model_dir_and_npy_output(capsys, tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "embeddings.npy"
    code, stdout, err = run(capsys, "embed", tiny_bert, *SENTENCES, "--out", out, "--batch-size", "2")
    assert code == 0, err
    assert stdout == ""
    embeddings = np.load(out)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (len(SENTENCES), 40)
    reference = transformers_embeddings(tiny_bert, SENTENCES, TINY_MAX_SEQ_LENGTH)
    assert float(cosines(embeddings, reference).min()) >= 0.99999
    assert f"embedded {len(SENTENCES)}/{len(SENTENCES)} sentences" in err, "more than one batch reports progress"
    assert list(tmp_path.iterdir()) == [out], "no temporary file is left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "the file gets the mode a plain open() would"


def test_input_file_jsonl_output_and_trace(capsys, tiny_bert: Path, tmp_path: Path) -> None:
    source = tmp_path / "sentences.txt"
    source.write_text("first line\nsecond, longer line\n", encoding="utf-8")
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.json"
    code, _, err = run(capsys, "embed", "--model", tiny_bert, "--input", source, "--out", out, "--trace", trace)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["sentence"] for r in records] == ["first line", "second, longer line"]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert events, "the trace has one event per task"


def test_max_length_truncates_and_verifies(capsys, tiny_bert: Path) -> None:
    long = "one two three four five six seven eight nine ten eleven twelve"
    code, out, err = run(capsys, "embed", tiny_bert, long, "--max-length", "6", "--verify")
    assert code == 0, err
    truncated = np.array(json.loads(out)["embedding"])
    reference = transformers_embeddings(tiny_bert, [long], 6)
    assert float(cosines(truncated[None], reference)[0]) >= 0.99999
    code, _, err = run(capsys, "embed", tiny_bert, long, "--max-length", "65")
    assert_clean_error(code, err, "at most the model's max_position_embeddings, 64")


def test_standard_input(capsys, monkeypatch, tiny_bert: Path) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    code, out, err = run(capsys, "embed", tiny_bert, "--input", "-", "--backend", "reference")
    assert code == 0, err
    assert json.loads(out)["sentence"] == "from stdin"


def test_bad_input(capsys, tiny_bert: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "embed", tiny_bert)
    assert_clean_error(code, err, "no sentences")
    code, _, err = run(capsys, "embed", "hi", "--out", tmp_path / "out.txt")
    assert_clean_error(code, err, "must end in .npy or .jsonl or .json")
    code, _, err = run(capsys, "embed", "hi", "--out", tmp_path / "missing" / "out.npy")
    assert_clean_error(code, err, "does not exist")
    code, _, err = run(capsys, "embed", "hi", "--batch-size", "0")
    assert_clean_error(code, err, "--batch-size must be at least 1")
    code, _, err = run(capsys, "embed", "hi", "--model", tmp_path)
    assert_clean_error(code, err, "no config.json")
    code, _, err = run(capsys, "embed", "hi", "--backend", "reference", "--trace", tmp_path / "t.json")
    assert_clean_error(code, err, "--trace needs --backend cpu or cuda")
    code, _, err = run(capsys, "embed", "hi", "--input", tmp_path / "missing.txt")
    assert_clean_error(code, err, "--input")
    code, _, err = run(capsys, "embed", tmp_path, "hi")
    assert_clean_error(code, err, "directory without config.json")
    assert list(tmp_path.iterdir()) == [], "a failed run writes no file"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "embed", "--input", empty)
    assert_clean_error(code, err, "contains no lines")


def test_cuda_without_a_gpu(capsys, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = run(capsys, "embed", "hi", "--backend", "cuda")
    assert_clean_error(code, err, "no CUDA device is visible")


def test_generate_points_bert_models_to_embed(capsys) -> None:
    code, _, err = run(capsys, "generate", minilm_dir(), "--prompt-ids", "1,2")
    assert_clean_error(code, err, "mpk embed MODEL_DIR")
