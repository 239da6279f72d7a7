"""The CPU backend: generated C++, persistent worker threads, both scheduling modes.

Tokens and logits are checked against transformers on the shared tiny checkpoints, with
more workers than cores, with random delays inserted into tasks, and under
ThreadSanitizer. The build cache, the watchdog and the trace are checked on their own.
"""

from __future__ import annotations

import json
import time
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fixtures_models import NEW_TOKENS, PROMPT, greedy_reference, single_torch_thread, worst_step_error  # noqa: F401 (fixture)
from mpk.backends.cpu import build as cpu_build
from mpk.backends.cpu.build import BuildError, build_library
from mpk.backends.cpu.executor import CpuExecutor
from mpk.compiler.pipeline import CompileOptions, compile_graph
from mpk.compiler.taskgraph import TaskGraphFileError, load_task_graph
from mpk.errors import MpkError, RuntimeStallError
from mpk.frontend.checkpoint import Checkpoint
from mpk.frontend.config import load_config
from mpk.frontend.decoder import decoder_graph
from mpk.generate import Session, cache_length
from mpk.runtime.reference import new_state
from mpk.runtime.weights import load_weights
from mpk.target import cpu_target

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request: pytest.FixtureRequest):
    path = request.getfixturevalue(f"{request.param}_dir")
    return path, greedy_reference(path, PROMPT, NEW_TOKENS)


def generate(model_dir: Path, workers: int, mode: str = "static", max_delay_ns: int = 0, chunk: int = 4):
    cfg = load_config(model_dir)
    session = Session(model_dir, max_seq_len=cache_length(cfg, len(PROMPT) + NEW_TOKENS, None), chunk=chunk,
                      backend="cpu", target=cpu_target(workers), mode=mode, max_delay_ns=max_delay_ns)
    try:
        return session.generate(PROMPT, NEW_TOKENS)
    finally:
        session.close()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_tokens_match_transformers(model, workers: int, mode: str) -> None:
    path, reference = model

    result = generate(path, workers, mode)

    assert result.tokens == reference.tokens
    assert worst_step_error(result.logits, reference.logits) < 1e-4


@pytest.mark.parametrize("mode, splits", [("static", 3), ("dynamic", 3), ("static", 64)])
def test_split_decode_attention_matches_transformers(model, mode: str, splits: int) -> None:
    # Decode attention over 3 chunks of the 64-slot cache (22, 22 and 20 slots), whose
    # boundaries the prompt and the new tokens cross, and over 64 chunks of one slot.
    path, reference = model
    cfg = load_config(path)
    session = Session(path, max_seq_len=cache_length(cfg, len(PROMPT) + NEW_TOKENS, None), chunk=4, backend="cpu",
                      target=cpu_target(2), mode=mode, attention_splits=splits)
    try:
        result = session.generate(PROMPT, NEW_TOKENS)
        kinds = {op.kind for op in session.graphs[1].graph.ops}
    finally:
        session.close()

    assert {"split_attention", "attention_combine"} <= kinds
    assert result.tokens == reference.tokens
    assert worst_step_error(result.logits, reference.logits) < 1e-4


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_random_delays_keep_tokens(model, mode: str) -> None:
    # Up to 20 us before every task reshuffles which worker finishes first.
    path, reference = model

    result = generate(path, 3, mode, max_delay_ns=20_000, chunk=16)

    assert result.tokens == reference.tokens
    assert worst_step_error(result.logits, reference.logits) < 1e-4


def test_bf16_checkpoint_matches_transformers(tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "bf16", "qwen3", seed=5, dtype=torch.bfloat16)
    reference = greedy_reference(path, PROMPT, NEW_TOKENS)

    result = generate(path, 2)

    assert result.tokens == reference.tokens
    assert worst_step_error(result.logits, reference.logits) < 1e-4


# --- runtime behaviour ---------------------------------------------------------------------


def compiled(model_dir: Path, workers: int = 2, verify: bool = True):
    cfg = load_config(model_dir)
    target = cpu_target(workers)
    tg = compile_graph(decoder_graph(cfg, 1, 32, target), target, CompileOptions(verify=verify))
    return tg, load_weights(tg.graph, Checkpoint(model_dir))


def decode_inputs(position: int) -> dict[str, torch.Tensor]:
    return {"tokens": torch.tensor([PROMPT[position % len(PROMPT)]]), "positions": torch.tensor([position])}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_watchdog_names_stuck_event(qwen3_dir: Path, mode: str) -> None:
    tg, weights = compiled(qwen3_dir, verify=False)
    broken = next(e for e in range(1, tg.end) if tg.last[e] > tg.first[e])
    tg.num_triggers[broken] += 1  # one trigger more than tasks that signal it: it never fires
    executor = CpuExecutor(tg, weights, new_state(tg), mode=mode, watchdog_seconds=0.2)

    with pytest.raises(RuntimeStallError) as error:
        executor.run(decode_inputs(0))
    executor.close()

    message = str(error.value)
    assert f"earliest event that has not fired is event {broken}" in message
    assert f"target {tg.num_triggers[broken]})" in message
    assert f"task {tg.first[broken]}" in message
    assert ("watchdog: worker" in message) if mode == "static" else ("watchdog: the host" in message)


def test_stalled_executor_stays_stopped(qwen3_dir: Path) -> None:
    tg, weights = compiled(qwen3_dir, verify=False)
    tg.num_triggers[tg.end] += 1
    executor = CpuExecutor(tg, weights, new_state(tg), watchdog_seconds=0.1)
    with pytest.raises(RuntimeStallError):
        executor.run(decode_inputs(0))

    with pytest.raises(RuntimeStallError):
        executor.run(decode_inputs(1))
    executor.close()


def test_trace_has_every_task(qwen3_dir: Path, tmp_path: Path) -> None:
    tg, weights = compiled(qwen3_dir, workers=2)
    executor = CpuExecutor(tg, weights, new_state(tg), trace=True)
    executor.run(decode_inputs(0))

    path = executor.write_trace(tmp_path / "trace.json")
    executor.close()

    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["args"]["task"] for e in events) == list(range(tg.num_tasks))
    assert {e["tid"] for e in events} == {0, 1}
    assert all(e["dur"] > 0 for e in events)
    assert all(e["tid"] == tg.worker[e["args"]["task"]] for e in events)


def test_out_of_range_position_rejected(qwen3_dir: Path) -> None:
    tg, weights = compiled(qwen3_dir)
    executor = CpuExecutor(tg, weights, new_state(tg))

    with pytest.raises(MpkError, match="index the KV cache slots.*below 32"):
        executor.run({"tokens": torch.tensor([1]), "positions": torch.tensor([32])})
    executor.close()


def test_out_of_range_token_rejected(qwen3_dir: Path) -> None:
    tg, weights = compiled(qwen3_dir)
    executor = CpuExecutor(tg, weights, new_state(tg))

    with pytest.raises(MpkError, match=r"0\.\.255"):
        executor.run({"tokens": torch.tensor([256]), "positions": torch.tensor([0])})
    executor.close()


def test_corrupted_task_graph_file(qwen3_dir: Path, tmp_path: Path) -> None:
    tg, _ = compiled(qwen3_dir)
    path = tg.save(tmp_path)
    path.write_text(path.read_text()[: path.stat().st_size // 2])

    with pytest.raises(TaskGraphFileError, match="compile it again"):
        load_task_graph(tmp_path)


# --- build and cache ---------------------------------------------------------------------

SOURCE = 'extern "C" int answer() { return 42; }\n'


def test_cached_build_skips_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_library(SOURCE)
    calls = []
    monkeypatch.setattr(cpu_build, "_compile", lambda *args: calls.append(args))

    second = build_library(SOURCE)

    assert second == first
    assert calls == []


def test_corrupted_cache_entry_rebuilt(caplog: pytest.LogCaptureFixture) -> None:
    library = build_library(SOURCE + "// corrupted entry\n")
    library.write_bytes(library.read_bytes()[:100])

    rebuilt = build_library(SOURCE + "// corrupted entry\n")

    assert "stale or corrupted" in caplog.text
    assert rebuilt.stat().st_size > 100
    assert subprocess_answer(rebuilt) == 42


def test_stale_manifest_rebuilt(caplog: pytest.LogCaptureFixture) -> None:
    library = build_library(SOURCE + "// stale entry\n")
    manifest = library.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["key"] = "0" * 64
    manifest.write_text(json.dumps(data))

    build_library(SOURCE + "// stale entry\n")

    assert "stale or corrupted" in caplog.text
    assert json.loads(manifest.read_text())["key"] != "0" * 64


def subprocess_answer(library: Path) -> int:
    code = f"import ctypes; print(ctypes.CDLL({str(library)!r}).answer())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")

    with pytest.raises(BuildError) as error:
        build_library(SOURCE + "// no compiler\n")

    assert "/nonexistent/c++" in str(error.value)
    assert "install g++" in str(error.value)


def test_build_failure_shows_compiler_message() -> None:
    with pytest.raises(BuildError) as error:
        build_library("int broken( {\n")

    message = str(error.value)
    assert "graph.cpp" in message
    assert "error" in message
    assert Path(message.split(" failed on ")[1].split(" (exit")[0]).is_file()


# --- ThreadSanitizer ---------------------------------------------------------------------

TSAN_SCRIPT = textwrap.dedent("""
    import sys, torch
    from mpk.generate import Session
    from mpk.target import cpu_target
    from fixtures_models import NEW_TOKENS, PROMPT
    mode, model_dir = sys.argv[1], sys.argv[2]
    session = Session(model_dir, max_seq_len=64, chunk=4, backend="cpu", target=cpu_target(3),
                      mode=mode, sanitize="thread", max_delay_ns=5000)
    print(",".join(map(str, session.generate(PROMPT, 8).tokens)))
    session.close()
""")


def tsan_runtime() -> str:
    path = subprocess.run(["c++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(path), f"ThreadSanitizer runtime not found (c++ -print-file-name=libtsan.so gave {path!r}); install libtsan"
    return path


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_thread_sanitizer_clean(qwen3_dir: Path, mode: str) -> None:
    reference = greedy_reference(qwen3_dir, PROMPT, 8)
    env = dict(os.environ, LD_PRELOAD=tsan_runtime(), TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))

    result = subprocess.run([sys.executable, "-c", TSAN_SCRIPT, mode, str(qwen3_dir)], capture_output=True, text=True, env=env, timeout=600)

    assert "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == ",".join(map(str, reference.tokens))


RACY_SOURCE = """
#include <thread>
int shared_value = 0;
extern "C" int race() {
  std::thread a([] { shared_value++; });
  std::thread b([] { shared_value++; });
  a.join();
  b.join();
  return shared_value;
}
"""


def test_thread_sanitizer_catches_race() -> None:
    # The harness above must be able to fail: the same setup reports a plain data race.
    library = build_library(RACY_SOURCE, sanitize="thread")
    env = dict(os.environ, LD_PRELOAD=tsan_runtime(), TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    code = f"import ctypes; ctypes.CDLL({str(library)!r}).race()"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)

    assert result.returncode == 66
    assert "data race" in result.stderr


# --- text prompts --------------------------------------------------------------------------


def add_word_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """Save a whitespace word-level tokenizer with ``vocab_size`` entries beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = {word: i for i, word in enumerate(words + [f"w{i}" for i in range(len(words), vocab_size)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(model_dir)


def test_text_prompt_uses_checkpoint_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from checkpoints import make_checkpoint
    from transformers import AutoTokenizer

    from mpk.cli import main

    path = make_checkpoint(tmp_path / "words", "qwen3", seed=9)
    add_word_tokenizer(path, 256)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer.encode("the cat sat on the mat")
    reference = greedy_reference(path, ids, 6)

    code = main(["generate", str(path), "--prompt", "the cat sat on the mat", "--max-new-tokens", "6", "--workers", "2"])

    out = capsys.readouterr().out.strip()
    assert code == 0
    assert ids == [1, 2, 3, 4, 1, 5]
    assert out == tokenizer.decode(reference.tokens)


def test_text_prompt_without_tokenizer(qwen3_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from mpk.cli import main

    code = main(["generate", str(qwen3_dir), "--prompt", "hello"])

    err = capsys.readouterr().err
    assert code == 2
    assert "has no tokenizer" in err
    assert "--prompt-ids" in err


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_idle_runtime_parks_and_wakes(qwen3_dir: Path, mode: str) -> None:
    tg, weights = compiled(qwen3_dir, workers=2)
    executor = CpuExecutor(tg, weights, new_state(tg), mode=mode)
    first = executor.run(decode_inputs(0))["lm_head.out"].clone()

    # Past the spin and yield stages (a few milliseconds) the threads park on a futex.
    time.sleep(0.2)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    idle_cpu = time.process_time() - cpu_before
    idle_wall = time.perf_counter() - wall_before
    # Napping threads would burn a good share of a core here; parked ones burn none.
    assert idle_cpu < 0.05 * idle_wall, f"an idle runtime used {idle_cpu:.3f} s of CPU in {idle_wall:.2f} s"

    # The parked threads wake for the next iteration, which computes the same position.
    again = executor.run(decode_inputs(0))["lm_head.out"]
    executor.close()
    assert torch.equal(first, again)
