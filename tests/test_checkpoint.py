from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_checkpoint, reference_model
from mpk.errors import CheckpointError
from mpk.frontend.checkpoint import INDEX_FILE, Checkpoint

NORM = "model.norm.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
SAMPLE_SHAPES = {Q_PROJ: (64, 64), NORM: (64,), "lm_head.weight": (256, 64)}


@pytest.fixture()
def qwen3_copy(qwen3_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shared Qwen3 checkpoint that a test may damage."""
    return Path(shutil.copytree(qwen3_dir, tmp_path / "copy"))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared Qwen3 checkpoint (seed 0) saved again in 20 KB shards."""
    return make_checkpoint(tmp_path_factory.mktemp("sharded"), "qwen3", shard_size="20KB")


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model-*.safetensors"))


# --- reading ----------------------------------------------------------------------------


def test_names_match_transformers(qwen3_dir: Path) -> None:
    model = reference_model(qwen3_dir)

    assert Checkpoint(qwen3_dir).names() == sorted(model.state_dict())


def test_tied_checkpoint_has_no_lm_head(llama_dir: Path) -> None:
    # transformers 5 saves a tied lm_head only as model.embed_tokens.weight.
    checkpoint = Checkpoint(llama_dir)

    assert checkpoint.has("model.embed_tokens.weight")
    assert not checkpoint.has("lm_head.weight")


def test_load_matches_transformers(qwen3_dir: Path) -> None:
    checkpoint = Checkpoint(qwen3_dir)
    state = reference_model(qwen3_dir).state_dict()

    for name, expected in state.items():
        loaded = checkpoint.load(name, tuple(expected.shape))
        assert loaded.dtype == torch.float32, name
        assert torch.equal(loaded, expected), name


def test_load_converts_dtype(qwen3_dir: Path) -> None:
    checkpoint = Checkpoint(qwen3_dir)
    as_float32 = checkpoint.load(Q_PROJ, (64, 64))
    as_bfloat16 = checkpoint.load(Q_PROJ, (64, 64), dtype=torch.bfloat16)

    assert as_bfloat16.dtype == torch.bfloat16
    assert torch.equal(as_bfloat16, as_float32.to(torch.bfloat16))


def test_sharded_matches_single_file(qwen3_dir: Path, sharded_dir: Path) -> None:
    single = Checkpoint(qwen3_dir)
    sharded = Checkpoint(sharded_dir)
    state = reference_model(qwen3_dir).state_dict()

    assert (sharded_dir / INDEX_FILE).is_file()
    assert len(shard_files(sharded_dir)) > 1
    assert sharded.names() == single.names()
    for name in single.names():
        shape = tuple(state[name].shape)
        assert torch.equal(sharded.load(name, shape), single.load(name, shape)), name


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")],
)
def test_stored_dtypes_load(
    qwen3_dir: Path, tmp_path: Path, dtype: torch.dtype, name: str
) -> None:
    # Same seed as the float32 fixture, so the stored values are its values rounded to dtype.
    model_dir = make_checkpoint(tmp_path, "qwen3", dtype=dtype)
    checkpoint = Checkpoint(model_dir)
    reference = Checkpoint(qwen3_dir)

    assert checkpoint.dtype == name
    for tensor_name, shape in SAMPLE_SHAPES.items():
        expected = reference.load(tensor_name, shape)
        loaded = checkpoint.load(tensor_name, shape)
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, expected.to(dtype).float()), tensor_name


def test_lone_safetensors_file_with_other_name(qwen3_copy: Path) -> None:
    (qwen3_copy / "model.safetensors").rename(qwen3_copy / "weights.safetensors")

    checkpoint = Checkpoint(qwen3_copy)

    assert checkpoint.has(NORM)
    assert checkpoint.load(NORM, (64,)).shape == (64,)


def test_mixed_dtypes_report_majority(tmp_path: Path) -> None:
    save_file(
        {"big": torch.zeros(100, dtype=torch.bfloat16), "small": torch.zeros(10, dtype=torch.float32)},
        str(tmp_path / "model.safetensors"),
    )

    assert Checkpoint(tmp_path).dtype == "bfloat16"


# --- bad input --------------------------------------------------------------------------


def test_directory_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(CheckpointError) as info:
        Checkpoint(missing)

    message = str(info.value)
    assert str(missing) in message
    assert "directory not found" in message


def test_no_safetensors_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(tmp_path)

    message = str(info.value)
    assert str(tmp_path) in message
    assert "no .safetensors file" in message
    assert ".bin/.pth" in message


def test_bin_checkpoint_named(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")

    with pytest.raises(CheckpointError) as info:
        Checkpoint(tmp_path)

    message = str(info.value)
    assert "Found pytorch_model.bin" in message
    assert "save_pretrained" in message


def test_several_files_without_index(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "copy"))
    (copy / INDEX_FILE).unlink()

    with pytest.raises(CheckpointError) as info:
        Checkpoint(copy)

    message = str(info.value)
    assert "model-00001-of-" in message
    assert f"no {INDEX_FILE}" in message


def test_index_references_missing_shard(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "copy"))
    removed = shard_files(copy)[1]
    removed.unlink()

    with pytest.raises(CheckpointError) as info:
        Checkpoint(copy)

    message = str(info.value)
    assert str(copy / INDEX_FILE) in message
    assert removed.name in message
    assert "missing" in message


def test_index_not_json(qwen3_copy: Path) -> None:
    (qwen3_copy / INDEX_FILE).write_text("{")

    with pytest.raises(CheckpointError) as info:
        Checkpoint(qwen3_copy)

    assert str(qwen3_copy / INDEX_FILE) in str(info.value)


def test_index_without_weight_map(qwen3_copy: Path) -> None:
    (qwen3_copy / INDEX_FILE).write_text(json.dumps({"metadata": {}}))

    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        Checkpoint(qwen3_copy)


def test_index_maps_tensor_to_wrong_shard(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "copy"))
    index = json.loads((copy / INDEX_FILE).read_text())
    right_shard = index["weight_map"][NORM]
    wrong_shard = next(f for f in sorted(set(index["weight_map"].values())) if f != right_shard)
    index["weight_map"][NORM] = wrong_shard
    (copy / INDEX_FILE).write_text(json.dumps(index))

    with pytest.raises(CheckpointError) as info:
        Checkpoint(copy).load(NORM, (64,))

    message = str(info.value)
    assert f"'{NORM}'" in message
    assert wrong_shard in message
    assert "does not contain it" in message


def test_corrupt_file(qwen3_copy: Path) -> None:
    path = qwen3_copy / "model.safetensors"
    path.write_bytes(b"this is not a safetensors file" * 4)

    with pytest.raises(CheckpointError) as info:
        Checkpoint(qwen3_copy)

    message = str(info.value)
    assert str(path) in message
    assert "corrupt or truncated" in message


def test_truncated_file(qwen3_copy: Path) -> None:
    path = qwen3_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError) as info:
        Checkpoint(qwen3_copy)

    message = str(info.value)
    assert str(path) in message
    assert "could not be read as a safetensors file" in message


def test_corrupt_shard_found_on_load(sharded_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "copy"))
    index = json.loads((copy / INDEX_FILE).read_text())
    shard = copy / index["weight_map"][NORM]
    shard.write_bytes(b"\0" * 16)
    checkpoint = Checkpoint(copy)

    with pytest.raises(CheckpointError) as info:
        checkpoint.load(NORM, (64,))

    message = str(info.value)
    assert str(shard) in message
    assert "Download it again" in message


def test_missing_tensor_suggests_close_name(qwen3_dir: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(qwen3_dir).load(Q_PROJ + "s", (64, 64))

    message = str(info.value)
    assert f"'{Q_PROJ}s' not found" in message
    assert str(qwen3_dir / "model.safetensors") in message
    assert f"Close names: {Q_PROJ}" in message


def test_missing_tensor_without_close_name(sharded_dir: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(sharded_dir).load("vision_tower.patch_embed", (1,))

    message = str(info.value)
    assert "'vision_tower.patch_embed' not found" in message
    assert f"shards listed in {sharded_dir / INDEX_FILE}" in message
    assert "Close names" not in message


def test_wrong_shape(qwen3_dir: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(qwen3_dir).load(Q_PROJ, (64, 32))

    message = str(info.value)
    assert f"'{Q_PROJ}'" in message
    assert "has shape [64, 64], expected [64, 32]" in message
    assert str(qwen3_dir / "model.safetensors") in message


def test_integer_tensor(tmp_path: Path) -> None:
    save_file({NORM: torch.arange(64)}, str(tmp_path / "model.safetensors"))

    with pytest.raises(CheckpointError) as info:
        Checkpoint(tmp_path).load(NORM, (64,))

    message = str(info.value)
    assert f"'{NORM}'" in message
    assert "dtype I64" in message
    assert "floating-point" in message


def test_no_floating_tensors(tmp_path: Path) -> None:
    save_file({"ids": torch.arange(4)}, str(tmp_path / "model.safetensors"))

    with pytest.raises(CheckpointError, match="contains no floating-point tensors"):
        Checkpoint(tmp_path).dtype
