"""The command line, run in-process through mpk.cli.main.

Bad input must end with exit code 2 and one `error:` line that names the file, tensor or
value at fault and the fix, never with a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mpk.hf_reference
from fixtures_models import PROMPT, greedy_reference, single_torch_thread  # noqa: F401 (fixture)
from mpk.cli import main
from mpk.compiler.taskgraph import FILENAME, load_task_graph

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPT_IDS = ",".join(str(t) for t in PROMPT)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str) -> None:
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err


@pytest.fixture()
def qwen3_copy(qwen3_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shared Qwen3 checkpoint that a test may damage."""
    return Path(shutil.copytree(qwen3_dir, tmp_path / "qwen3"))


def rewrite_weights(model_dir: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the tensor dict, and save it back."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- compile and inspect ----------------------------------------------------------------


def test_compile_writes_taskgraph(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "tg"

    code, out, _ = run(capsys, "compile", qwen3_dir, "--target", "cpu", "--workers", 3, "--out", out_dir)

    assert code == 0
    assert (out_dir / FILENAME).is_file()
    assert str(out_dir / FILENAME) in out
    tg = load_task_graph(out_dir)
    assert tg.target.workers == 3
    assert tg.graph.tokens == 1


def test_compile_tokens_and_max_seq_len(capsys, llama_dir: Path, tmp_path: Path) -> None:
    code, _, _ = run(capsys, "compile", llama_dir, "--workers", 5, "--tokens", 4, "--max-seq-len", 32, "--out", tmp_path)

    assert code == 0
    tg = load_task_graph(tmp_path)
    assert tg.graph.tokens == 4
    assert tg.graph.meta["max_seq_len"] == 32


def test_compile_preset(capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "compile", "--preset", "qwen3-0.6b", "--workers", 8, "--out", tmp_path)

    assert code == 0
    assert "qwen3" in out
    tg = load_task_graph(tmp_path)
    assert tg.graph.meta["model"]["vocab_size"] == 151936
    assert tg.target.workers == 8


def test_compile_gpu_target(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    code, _, _ = run(capsys, "compile", qwen3_dir, "--target", "h100", "--out", tmp_path)

    assert code == 0
    assert load_task_graph(tmp_path).target.workers == 132


def test_inspect_summary(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    run(capsys, "compile", qwen3_dir, "--workers", 3, "--out", tmp_path)

    code, out, _ = run(capsys, "inspect", tmp_path)

    assert code == 0
    for heading in ("operators:", "tasks:", "events:", "per-worker load", "critical path"):
        assert heading in out, heading
    for worker in range(3):
        assert f"worker {worker:4d}:" in out
    assert "worker    3:" not in out


def test_inspect_reads_file_path(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    run(capsys, "compile", qwen3_dir, "--workers", 2, "--out", tmp_path)

    code, out, _ = run(capsys, "inspect", tmp_path / FILENAME)

    assert code == 0
    assert "operators:" in out


# --- generate ---------------------------------------------------------------------------


def test_generate_verify_ok(capsys, qwen3_dir: Path) -> None:
    code, out, err = run(capsys, "generate", qwen3_dir, "--backend", "reference", "--prompt-ids", PROMPT_IDS,
                         "--max-new-tokens", 8, "--workers", 3, "--verify")

    assert code == 0
    assert "verify: OK" in err
    assert out.strip() == ",".join(str(t) for t in greedy_reference(qwen3_dir, PROMPT, 8).tokens)


def test_generate_verify_mismatch(capsys, monkeypatch, llama_dir: Path) -> None:
    real = mpk.hf_reference.transformers_greedy

    def altered(model_dir, prompt, max_new_tokens, dtype=torch.float32):
        tokens, logits = real(model_dir, prompt, max_new_tokens, dtype)
        tokens[3] = (tokens[3] + 1) % logits.shape[1]
        # Scaled by 1.5, the reference is off by ||0.5 r|| / ||1.5 r|| = 1/3 at every step.
        return tokens, logits * 1.5

    monkeypatch.setattr(mpk.hf_reference, "transformers_greedy", altered)

    code, _, err = run(capsys, "generate", llama_dir, "--prompt-ids", PROMPT_IDS, "--max-new-tokens", 8, "--verify")

    assert code != 0
    assert "verify: FAILED" in err
    assert "new position 3" in err
    assert "logits relative error 3.333e-01" in err


def test_generate_chunk_and_seed(capsys, llama_dir: Path) -> None:
    code, out, _ = run(capsys, "generate", llama_dir, "--prompt-ids", PROMPT_IDS, "--max-new-tokens", 6,
                       "--chunk", 3, "--seed", 9, "--workers", 7)

    assert code == 0
    assert out.strip() == ",".join(str(t) for t in greedy_reference(llama_dir, PROMPT, 6).tokens)


# --- bad input --------------------------------------------------------------------------


def test_missing_config(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "compile", tmp_path, "--out", tmp_path / "out")

    assert_clean_error(code, err)
    assert str(tmp_path / "config.json") in err
    assert "not found" in err


def test_missing_config_generate(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "generate", tmp_path, "--prompt-ids", "1,2")

    assert_clean_error(code, err)
    assert str(tmp_path / "config.json") in err


def test_unsupported_architecture(capsys, qwen3_copy: Path, tmp_path: Path) -> None:
    config_path = qwen3_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(config))

    code, _, err = run(capsys, "compile", qwen3_copy, "--out", tmp_path / "out")

    assert_clean_error(code, err)
    assert "GPT2LMHeadModel" in err
    assert str(config_path) in err
    assert "Qwen3ForCausalLM" in err  # the supported choices


def test_missing_tensor(capsys, qwen3_copy: Path) -> None:
    rewrite_weights(qwen3_copy, lambda tensors: tensors.pop(Q_PROJ))

    code, _, err = run(capsys, "generate", qwen3_copy, "--prompt-ids", "1,2,3", "--max-new-tokens", 2)

    assert_clean_error(code, err)
    assert Q_PROJ in err
    assert "not found" in err


def test_wrongly_shaped_tensor(capsys, qwen3_copy: Path) -> None:
    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        tensors[Q_PROJ] = tensors[Q_PROJ].reshape(32, 128).contiguous()

    rewrite_weights(qwen3_copy, reshape)

    code, _, err = run(capsys, "generate", qwen3_copy, "--prompt-ids", "1,2,3", "--max-new-tokens", 2)

    assert_clean_error(code, err)
    assert Q_PROJ in err
    assert "[32, 128]" in err
    assert "[64, 64]" in err


def test_prompt_longer_than_max_positions(capsys, qwen3_dir: Path) -> None:
    # The test checkpoints have max_position_embeddings 128.
    ids = ",".join(str(i % 200) for i in range(130))

    code, _, err = run(capsys, "generate", qwen3_dir, "--prompt-ids", ids, "--max-new-tokens", 1)

    assert_clean_error(code, err)
    assert "128" in err
    assert "130" in err  # positions needed: the 130 prompt tokens; the new token is never fed back
    assert "shorten the prompt" in err


def test_prompt_filling_max_positions(capsys, qwen3_dir: Path) -> None:
    # 128 prompt tokens sit at positions 0..127; the one new token is never fed back, so
    # it needs no position, and transformers generates it.
    prompt = [i % 200 for i in range(128)]

    code, out, err = run(capsys, "generate", qwen3_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", 1)

    assert code == 0, err
    assert out.strip() == str(greedy_reference(qwen3_dir, prompt, 1).tokens[0])


def test_zero_max_seq_len(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "compile", qwen3_dir, "--max-seq-len", 0, "--out", tmp_path)

    assert_clean_error(code, err)
    assert "--max-seq-len" in err


def test_zero_workers(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "compile", qwen3_dir, "--workers", 0, "--out", tmp_path)

    assert_clean_error(code, err)
    assert "--workers" in err
    assert "got 0" in err


def test_zero_workers_gpu(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "compile", qwen3_dir, "--target", "h100", "--workers", 0, "--out", tmp_path)

    assert_clean_error(code, err)
    assert "--workers 0" in err
    assert "1 to 132" in err


def test_corrupted_taskgraph(capsys, qwen3_dir: Path, tmp_path: Path) -> None:
    run(capsys, "compile", qwen3_dir, "--workers", 2, "--out", tmp_path)
    path = tmp_path / FILENAME
    text = path.read_text()
    path.write_text(text[: len(text) // 2])

    code, _, err = run(capsys, "inspect", tmp_path)

    assert_clean_error(code, err)
    assert str(path) in err
    assert "corrupted" in err
    assert "mpk compile" in err


INCONSISTENT_EDITS = {
    "op-index-out-of-range": lambda data: data["tasks"]["op"].__setitem__(0, 999),
    "tile-of-wrong-arity": lambda data: data["tasks"]["tile"].__setitem__(0, [1]),
    "event-column-short": lambda data: data["events"]["first"].pop(),
    "tensor-without-buffer": lambda data: data["placement"]["home"].pop("tokens"),
}


@pytest.mark.parametrize("edit", sorted(INCONSISTENT_EDITS))
def test_inconsistent_taskgraph(capsys, qwen3_dir: Path, tmp_path: Path, edit: str) -> None:
    # Valid JSON whose columns do not fit together, as a hand edit or another tool could leave it.
    run(capsys, "compile", qwen3_dir, "--workers", 2, "--out", tmp_path)
    path = tmp_path / FILENAME
    data = json.loads(path.read_text())
    INCONSISTENT_EDITS[edit](data)
    path.write_text(json.dumps(data))

    code, _, err = run(capsys, "inspect", tmp_path)

    assert_clean_error(code, err)
    assert str(path) in err


def test_missing_taskgraph(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", tmp_path)

    assert_clean_error(code, err)
    assert str(tmp_path / FILENAME) in err


def test_non_integer_prompt_ids(capsys, qwen3_dir: Path) -> None:
    code, _, err = run(capsys, "generate", qwen3_dir, "--prompt-ids", "1,2,x")

    assert_clean_error(code, err)
    assert "'1,2,x'" in err
    assert "comma-separated integers" in err


def test_prompt_id_outside_vocabulary(capsys, qwen3_dir: Path) -> None:
    code, _, err = run(capsys, "generate", qwen3_dir, "--prompt-ids", "1,256", "--max-new-tokens", 1)

    assert_clean_error(code, err)
    assert "256" in err
    assert "0..255" in err


def test_unknown_preset(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "compile", "--preset", "qwen9", "--out", tmp_path)

    assert_clean_error(code, err)
    assert "qwen9" in err
    assert "qwen3-8b" in err  # the known presets


def test_zero_new_tokens(capsys, qwen3_dir: Path) -> None:
    code, _, err = run(capsys, "generate", qwen3_dir, "--prompt-ids", "1,2", "--max-new-tokens", 0)

    assert_clean_error(code, err)
    assert "--max-new-tokens" in err
