"""Command-line interface: mpk compile | demo | bench | inspect | generate | simulate | embed."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from importlib.metadata import version

from mpk.errors import MpkError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MpkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (`mpk inspect tg | head`) went away; that is not an error of ours.
        sys.stderr.close()
        return 0
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log compiler and runtime progress")
    parser = argparse.ArgumentParser(prog="mpk", description="Compile LLM inference into one persistent megakernel.", parents=[common])
    parser.add_argument("--version", action="version", version=f"mpk {version('mpk')}")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_ = commands.add_parser("compile", parents=[common], help="compile a model into a task graph")
    compile_.add_argument("model", nargs="?", help="checkpoint directory (only config.json is read)")
    compile_.add_argument("--preset", help="compile a built-in model shape instead of MODEL_DIR (e.g. qwen3-8b)")
    compile_.add_argument("--out", required=True, type=Path, help="directory to write taskgraph.json into")
    add_target_options(compile_)
    compile_.add_argument("--tokens", type=int, default=1, help="tokens per iteration: 1 for decode, N for a prompt chunk (default 1)")
    compile_.add_argument("--max-seq-len", type=int, default=None, help="KV cache slots per layer (default: min(max positions, 4096))")
    compile_.set_defaults(func=run_compile)

    demo = commands.add_parser("demo", parents=[common], help="build a small Qwen3 model, compile it, generate and verify")
    demo.add_argument("--dir", type=Path, default=None, help="where to keep the demo checkpoint (default ~/.cache/mpk/demo-qwen3)")
    demo.add_argument("--workers", type=int, default=None, help="worker threads (default: all cores)")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    demo.set_defaults(func=run_demo)

    bench = commands.add_parser("bench", parents=[common], help="per-token decode latency: mpk, transformers eager, torch.compile, memory floor")
    bench.add_argument("model", type=Path, help="checkpoint directory")
    bench.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="backend to measure (default cpu)")
    bench.add_argument("--workers", type=int, default=None, help="threads for mpk and the baselines (default: all cores)")
    bench.add_argument("--steps", type=int, default=64, help="decode steps measured (default 64)")
    bench.add_argument("--mode", default="static", choices=["static", "dynamic"], help="scheduling mode (default static)")
    bench.add_argument("--no-baselines", action="store_true", help="measure mpk and the memory floor only")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (CUDA graphs on a GPU); it compiles for a minute or more")
    bench.set_defaults(func=run_bench)

    inspect = commands.add_parser("inspect", parents=[common], help="summarize a compiled task graph")
    inspect.add_argument("taskgraph", type=Path, help="directory (or file) written by mpk compile")
    inspect.set_defaults(func=run_inspect)

    generate = commands.add_parser("generate", parents=[common], help="greedy decoding of token ids")
    generate.add_argument("model", type=Path, help="checkpoint directory: config.json and safetensors")
    generate.add_argument("--backend", default=None, choices=["cuda", "cpu", "reference"],
                          help="cuda: the megakernel on the GPU (default when one is visible); cpu: the persistent kernel on CPU threads "
                               "(default otherwise); reference: torch, task by task, in a random order the events allow")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="prompt text, encoded with the checkpoint's own tokenizer")
    generate.add_argument("--ignore-eos", action="store_true", help="with --prompt: keep generating after the tokenizer's end-of-sequence token")
    generate.add_argument("--mode", default="static", choices=["static", "dynamic"],
                          help="cpu backend scheduling: static assignment (default) or dynamic dispatch by a scheduler thread")
    generate.add_argument("--trace", type=Path, default=None, help="cpu backend: write the last decode step's per-task timeline to this Chrome/Perfetto JSON file")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    generate.add_argument("--chunk", type=int, default=16, help="prompt tokens per iteration (default 16)")
    generate.add_argument("--max-seq-len", type=int, default=None, help="KV cache slots (default: prompt plus new tokens, rounded up to 64)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the reference executor's random task order (default 0)")
    generate.add_argument("--verify", action="store_true", help="also run transformers and fail on any mismatch")
    add_target_options(generate)
    generate.set_defaults(func=run_generate)

    from mpk.target import gpu_names

    simulate = commands.add_parser("simulate", parents=[common],
                                   help="predict per-token GPU latency of the megakernel and of kernel-per-operator execution")
    simulate.add_argument("model", nargs="?", help="checkpoint directory (only config.json is read)")
    simulate.add_argument("--preset", help="simulate a built-in model shape instead of MODEL_DIR (e.g. qwen3-8b)")
    simulate.add_argument("--gpu", required=True, choices=gpu_names(), help="GPU description to simulate")
    simulate.add_argument("--batch", type=int, default=1, help="rows (tokens) per iteration (default 1)")
    simulate.add_argument("--context", type=int, default=128, help="KV cache slots filled before the iteration (default 128)")
    simulate.add_argument("--sustained-fraction", type=float, default=None,
                          help="share of peak HBM bandwidth and flop rate that tasks reach, in (0, 1] (default: the GPU table's 0.9)")
    simulate.add_argument("--trace", type=Path, default=None,
                          help="write the static megakernel's simulated timeline (one track per SM) to this Chrome/Perfetto JSON file")
    simulate.set_defaults(func=run_simulate)

    from mpk.cli_embed import add_embed_parser

    add_embed_parser(commands, common)
    return parser


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", help="cpu, or a GPU: a100, h100, h200, b200 (default cpu)")
    parser.add_argument("--workers", type=int, default=None, help="worker threads (cpu) or SMs to use (default: all cores or SMs)")


def run_compile(args: argparse.Namespace) -> int:
    from mpk.compiler.pipeline import compile_graph
    from mpk.frontend.config import load_config
    from mpk.frontend.decoder import decoder_graph
    from mpk.frontend.presets import get_preset
    from mpk.target import make_target

    if (args.model is None) == (args.preset is None):
        raise MpkError("pass MODEL_DIR or --preset NAME (one of them, not both)" if args.preset else "missing model: pass MODEL_DIR or --preset NAME")
    if args.tokens < 1:
        raise MpkError(f"--tokens must be at least 1, got {args.tokens}")
    if args.max_seq_len is not None and args.max_seq_len < max(args.tokens, 1):
        raise MpkError(f"--max-seq-len must be at least --tokens ({args.tokens}), got {args.max_seq_len}")
    cfg = get_preset(args.preset) if args.preset else load_config(args.model)
    target = make_target(args.target, args.workers)
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else min(cfg.max_positions, 4096)
    start = time.perf_counter()
    tg = compile_graph(decoder_graph(cfg, args.tokens, max_seq_len, target), target)
    elapsed = time.perf_counter() - start
    path = tg.save(args.out)
    print(f"compiled {tg.graph.name} for {target.name}: {len(tg.graph.ops)} operators, {tg.num_tasks} tasks, "
          f"{tg.num_events} events in {elapsed:.2f} s -> {path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from mpk.demo import run_demo as demo

    if args.workers is not None and args.workers < 1:
        raise MpkError(f"--workers must be at least 1, got {args.workers}")
    if args.max_new_tokens < 1:
        raise MpkError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return demo(args.dir, args.workers, args.max_new_tokens, print)


def run_bench(args: argparse.Namespace) -> int:
    import os

    from mpk.bench import run_bench as bench

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise MpkError(f"--workers must be at least 1, got {workers}")
    if args.steps < 2:
        raise MpkError(f"--steps must be at least 2, got {args.steps}")
    if args.backend == "cuda":
        from mpk.backends.cuda.executor import check_device

        check_device(1)
    bench(args.model, workers, args.steps, args.mode, not args.no_baselines, not args.no_compile, print, args.backend)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from mpk.compiler.taskgraph import load_task_graph
    from mpk.compiler.verify import verify
    from mpk.inspect import summarize

    tg = load_task_graph(args.taskgraph)
    print(summarize(tg))
    verify(tg)
    print("verifier: every hazard is ordered by events and no worker can wait forever")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from mpk.frontend.config import load_config
    from mpk.generate import Session, cache_length, default_backend
    from mpk.target import make_target

    args.backend = args.backend or default_backend()
    tokenizer = load_tokenizer(args.model) if args.prompt is not None else None
    prompt = parse_ids(args.prompt_ids) if tokenizer is None else tokenizer.encode(args.prompt)
    if not prompt:
        raise MpkError(f"the prompt {args.prompt!r} encodes to no tokens; pass a longer prompt")
    if args.chunk < 1:
        raise MpkError(f"--chunk must be at least 1, got {args.chunk}")
    cfg = load_config(args.model)
    if args.max_new_tokens < 1:
        raise MpkError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    # The last new token is never fed back, so it needs no cache slot.
    max_seq_len = cache_length(cfg, len(prompt) + args.max_new_tokens - 1, args.max_seq_len)
    target = make_target(args.target, args.workers)
    if args.backend == "cuda":
        from mpk.backends.cuda.executor import check_device, cuda_target

        check_device(args.workers or 1)
        target = cuda_target()
        if args.workers is not None:
            target = type(target)(**{**target.to_dict(), "workers": args.workers})
    if args.trace is not None and args.backend == "reference":
        raise MpkError("--trace needs --backend cpu or cuda")
    if args.trace is not None and not args.trace.resolve().parent.is_dir():
        raise MpkError(f"--trace {args.trace}: the directory {args.trace.resolve().parent} does not exist; create it or pick another path")
    if args.backend == "cpu" and target.kind != "cpu":
        raise MpkError(f"--backend cpu runs on CPU threads; use --target cpu (got --target {args.target}), or --backend reference to check a GPU tiling")
    session = Session(args.model, max_seq_len=max_seq_len, chunk=args.chunk, backend=args.backend, target=target,
                      seed=args.seed, mode=args.mode, trace=args.trace is not None)
    start = time.perf_counter()
    stop = () if tokenizer is None or args.ignore_eos or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    result = session.generate(prompt, args.max_new_tokens, stop)
    elapsed = time.perf_counter() - start
    if tokenizer is not None:
        print(tokenizer.decode(result.tokens), flush=True)
    else:
        print(",".join(str(t) for t in result.tokens), flush=True)
    print(f"{len(result.tokens)} tokens in {elapsed:.2f} s ({len(result.tokens) / elapsed:.1f} tokens/s) "
          f"with the {args.backend} backend, {target.workers} workers", file=sys.stderr)
    if args.trace is not None:
        path = session.executors[1].write_trace(args.trace)
        print(f"trace of the last decode step: {path} (open it in https://ui.perfetto.dev)", file=sys.stderr)
    session.close()
    if args.verify:
        return verify_against_transformers(args.model, prompt, result)
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from mpk.frontend.config import load_config
    from mpk.frontend.presets import get_preset
    from mpk.sim.models import MEGAKERNEL_STATIC
    from mpk.sim.predict import Scenario, format_report, simulate_config
    from mpk.sim.trace import write_simulated_trace

    if (args.model is None) == (args.preset is None):
        raise MpkError("pass MODEL_DIR or --preset NAME (one of them, not both)" if args.preset else "missing model: pass MODEL_DIR or --preset NAME")
    cfg = get_preset(args.preset) if args.preset else load_config(args.model)
    report = simulate_config(cfg, Scenario(args.gpu, args.batch, args.context, args.sustained_fraction))
    print(format_report(report))
    if args.trace is not None:
        path = write_simulated_trace(report.task_graph, report.prediction(MEGAKERNEL_STATIC), args.trace)
        print(f"simulated timeline of the static megakernel: {path} (open it in https://ui.perfetto.dev)")
    return 0


def verify_against_transformers(model: Path, prompt: list[int], result) -> int:
    from mpk.hf_reference import compare, transformers_greedy

    ref_tokens, ref_logits = transformers_greedy(model, prompt, len(result.tokens))
    mismatch = compare(result.tokens, result.logits, ref_tokens, ref_logits)
    if mismatch.position is not None:
        print(f"verify: FAILED: first differing token at new position {mismatch.position}: mpk {result.tokens[mismatch.position]}, "
              f"transformers {ref_tokens[mismatch.position]}; logits relative error {mismatch.logits_rel_error:.3e} "
              f"(worst step {mismatch.worst_step_rel_error:.3e})", file=sys.stderr)
        return 1
    print(f"verify: OK: {len(ref_tokens)} tokens equal transformers'; logits relative error {mismatch.logits_rel_error:.3e} "
          f"(worst step {mismatch.worst_step_rel_error:.3e})", file=sys.stderr)
    return 0


def load_tokenizer(model: Path):
    """The checkpoint's own tokenizer, through transformers, offline."""
    from transformers import AutoTokenizer

    if not any((model / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise MpkError(f"{model} has no tokenizer (tokenizer.json or tokenizer_config.json); pass token ids with --prompt-ids")
    try:
        return AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MpkError(f"cannot load the tokenizer in {model}: {exc}; pass token ids with --prompt-ids") from None


def parse_ids(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part.lstrip("-").isdigit() for part in parts):
        raise MpkError(f"--prompt-ids must be comma-separated integers such as 1,2,3, got {text!r}")
    return [int(part) for part in parts]


if __name__ == "__main__":
    sys.exit(main())
