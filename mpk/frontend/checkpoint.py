"""Lazy, shape-checked access to the tensors of a safetensors checkpoint directory."""

from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mpk.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes of floating-point tensors -> torch dtype names.
_FLOAT_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

_OTHER_WEIGHT_SUFFIXES: tuple[str, ...] = (".bin", ".pth", ".pt", ".ckpt")


class Checkpoint:
    """Tensors of a Hugging Face checkpoint, read one at a time on request.

    The directory contains either model.safetensors.index.json with the shards its
    weight_map names, or a single *.safetensors file (usually model.safetensors).
    A shard is opened, and its header read, only when one of its tensors is requested.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"{self.model_dir}: checkpoint directory not found. Pass the directory that "
                "contains config.json and the *.safetensors files."
            )
        self._handles: dict[Path, safe_open] = {}
        self._file_keys: dict[Path, set[str]] = {}
        self._dtype: str | None = None

        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            self._weight_map = _read_index(index_path)
            self._files_description = f"the shards listed in {index_path}"
        else:
            path = _find_single_file(self.model_dir)
            self._open(path)
            self._weight_map = dict.fromkeys(self._file_keys[path], path)
            self._files_description = str(path)

    def names(self) -> list[str]:
        """Return every tensor name in the checkpoint, sorted."""
        return sorted(self._weight_map)

    def has(self, name: str) -> bool:
        """Return whether the checkpoint contains a tensor with this name."""
        return name in self._weight_map

    def load(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Read one tensor, check that its shape equals `shape` and convert it to `dtype`.

        Raises CheckpointError if the tensor is missing, has another shape, is not
        floating-point, or its file cannot be read.
        """
        if name not in self._weight_map:
            raise self._missing_tensor_error(name)
        path = self._weight_map[name]
        handle = self._open(path)
        if name not in self._file_keys[path]:
            raise CheckpointError(
                f"{self.model_dir / INDEX_FILE} maps tensor '{name}' to {path.name}, but that "
                "file does not contain it. The index does not match its shards. Save the "
                "checkpoint again or restore the index from the original download."
            )

        tensor_slice = handle.get_slice(name)
        found_shape = tuple(tensor_slice.get_shape())
        if found_shape != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {list(found_shape)}, expected "
                f"{list(shape)}. The checkpoint does not match its config.json. Check the "
                "sizes in config.json or use the config saved with these weights."
            )
        stored = tensor_slice.get_dtype()
        if stored not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {stored}, but mpk needs floating-point "
                "weights. Quantized checkpoints are not supported. Use the unquantized "
                "bfloat16, float16 or float32 release of the model."
            )

        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as err:
            raise _unreadable_error(path, err) from err
        return tensor.to(dtype)

    @property
    def dtype(self) -> str:
        """Stored dtype name of the floating-point tensors, such as "bfloat16".

        For a checkpoint that mixes floating dtypes, this is the dtype with the most
        elements. Reading it opens every shard's header, but no tensor data.
        """
        if self._dtype is None:
            self._dtype = self._majority_dtype()
        return self._dtype

    def _majority_dtype(self) -> str:
        elements: Counter[str] = Counter()
        for path in sorted(set(self._weight_map.values())):
            handle = self._open(path)
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                code = tensor_slice.get_dtype()
                if code in _FLOAT_DTYPES:
                    numel = 1
                    for size in tensor_slice.get_shape():
                        numel *= size
                    elements[_FLOAT_DTYPES[code]] += numel
        if not elements:
            raise CheckpointError(
                f"{self._files_description} contains no floating-point tensors. "
                "Use an unquantized bfloat16, float16 or float32 checkpoint."
            )
        return elements.most_common(1)[0][0]

    def _open(self, path: Path) -> safe_open:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise _unreadable_error(path, err) from err
            self._handles[path] = handle
            self._file_keys[path] = set(handle.keys())
        return handle

    def _missing_tensor_error(self, name: str) -> CheckpointError:
        close = difflib.get_close_matches(name, self._weight_map.keys(), n=3, cutoff=0.8)
        hint = f" Close names: {', '.join(close)}." if close else ""
        return CheckpointError(
            f"Tensor '{name}' not found in {self._files_description}.{hint} Check that the "
            "checkpoint matches the architecture in config.json."
        )


def _read_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(
            f"{index_path} could not be read as JSON ({err}). Restore it from the original "
            "download."
        ) from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path} has no 'weight_map' object mapping tensor names to shard files. "
            "Restore it from the original download."
        )

    model_dir = index_path.parent
    shards = {file_name: model_dir / file_name for file_name in set(weight_map.values())}
    missing = sorted(name for name, path in shards.items() if not path.is_file())
    if missing:
        raise CheckpointError(
            f"{index_path} references shard file(s) that are missing from {model_dir}: "
            f"{', '.join(missing)}. Download the missing shards again."
        )
    return {tensor: shards[file_name] for tensor, file_name in weight_map.items()}


def _find_single_file(model_dir: Path) -> Path:
    default = model_dir / SINGLE_FILE
    if default.is_file():
        return default
    candidates = sorted(model_dir.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise CheckpointError(
            f"{model_dir} contains {len(candidates)} .safetensors files "
            f"({', '.join(p.name for p in candidates)}) but no {INDEX_FILE}. Add the index "
            "that was saved with the shards, or keep only one file."
        )

    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in _OTHER_WEIGHT_SUFFIXES)
    found = f" Found {', '.join(others)}." if others else ""
    raise CheckpointError(
        f"{model_dir} contains no .safetensors file.{found} mpk reads only safetensors "
        "checkpoints. Convert .bin/.pth weights first, for example by loading the model with "
        "transformers and calling save_pretrained(dir), which writes safetensors."
    )


def _unreadable_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} could not be read as a safetensors file ({err}). The file is corrupt or "
        "truncated. Download it again."
    )
