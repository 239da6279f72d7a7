"""`mpk demo`: the whole pipeline on a built-in small Qwen3-architecture model.

The checkpoint is built once with seeded random weights (transformers writes it, in real
safetensors format) and reused from the cache directory afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path

from mpk.errors import MpkError
from mpk.frontend.config import load_config

DEMO_SHAPE = {
    "arch": "qwen3", "seed": 0, "hidden_size": 256, "intermediate_size": 768, "num_layers": 4,
    "num_heads": 8, "num_kv_heads": 4, "head_dim": 32, "vocab_size": 4096, "max_positions": 512,
}
DEMO_PROMPT = [11, 42, 7, 300, 1999, 5, 77, 1024, 3, 640]
DECODE_STEPS_TIMED = 64


def default_cache() -> Path:
    return Path.home() / ".cache" / "mpk" / "demo-qwen3"


def ensure_checkpoint(directory: Path) -> tuple[Path, bool]:
    """Return the demo checkpoint directory and whether it was built just now. Builds only
    into a missing or empty directory, never over someone else's files.
    """
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory, False
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise MpkError(f"--dir {directory} exists and does not hold a checkpoint; pass a new or empty directory")
    from mpk.synthetic import make_checkpoint

    return make_checkpoint(directory, **DEMO_SHAPE), True


def run_demo(directory: Path | None, workers: int | None, max_new_tokens: int, report) -> int:
    """Build (once), compile, generate and verify; ``report`` prints one line of progress."""
    from mpk.bench import PROMPT_TOKENS, bytes_per_token, time_with_probe
    from mpk.generate import Session, cache_length
    from mpk.hf_reference import compare, transformers_greedy
    from mpk.target import cpu_target

    start = time.perf_counter()
    model_dir, built = ensure_checkpoint(directory or default_cache())
    cfg = load_config(model_dir)
    report(f"model: {model_dir} ({'built' if built else 'cached'}; {cfg.architecture}, {cfg.num_layers} layers, "
           f"hidden {cfg.hidden_size}, {cfg.num_params / 1e6:.1f}M parameters) in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    target = cpu_target(workers)
    needed = max(len(DEMO_PROMPT) + max_new_tokens - 1, PROMPT_TOKENS + DECODE_STEPS_TIMED)
    session = Session(model_dir, max_seq_len=cache_length(cfg, needed, None), target=target)
    decode = session.graphs[1]
    report(f"compiled and built for {target.name} in {time.perf_counter() - start:.2f} s: decode step of {decode.num_tasks} tasks, "
           f"{decode.num_events} events; prompt chunk of {session.graphs[session.chunk].num_tasks} tasks")

    result = session.generate(DEMO_PROMPT, max_new_tokens)
    token_bytes = bytes_per_token(session, PROMPT_TOKENS + DECODE_STEPS_TIMED // 2)
    seconds, bandwidth = time_with_probe(session, DECODE_STEPS_TIMED, token_bytes, target.workers)
    session.close()
    report("tokens: " + ",".join(str(t) for t in result.tokens))
    report(f"decode: {seconds * 1e3:.3f} ms/token, {1 / seconds:.0f} tokens/s, {token_bytes / seconds / 1e9:.1f} GB/s; "
           f"memory floor {token_bytes / bandwidth * 1e3:.3f} ms ({token_bytes / 1e6:.1f} MB at {bandwidth / 1e9:.1f} GB/s measured), "
           f"{token_bytes / bandwidth / seconds * 100:.0f}% of the floor")

    ref_tokens, ref_logits = transformers_greedy(model_dir, DEMO_PROMPT, max_new_tokens)
    mismatch = compare(result.tokens, result.logits, ref_tokens, ref_logits)
    if mismatch.position is not None:
        report(f"verify: FAILED at new token {mismatch.position}; logits relative error {mismatch.logits_rel_error:.3e}")
        return 1
    report(f"verify: OK: {len(ref_tokens)} tokens equal transformers'; logits relative error {mismatch.logits_rel_error:.3e}")
    return 0
