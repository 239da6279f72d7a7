from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import Qwen3Config

from checkpoints import make_checkpoint, reference_model
from conftest import LLAMA3_TEST_ROPE_SCALING
from mpk.errors import ConfigError
from mpk.frontend.config import ModelConfig, RopeConfig, load_config, parse_config
from mpk.frontend.presets import PRESETS, get_preset

# The config.json of Qwen/Qwen3-0.6B (transformers 4.x layout), transcribed like the preset.
QWEN3_06B_V4 = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The config.json of meta-llama/Llama-3.2-1B (transformers 4.x layout), transcribed like the preset.
LLAMA32_1B_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Published parameter counts from the model cards: (total, non-embedding or None).
# Qwen's non-embedding count leaves out both the input embedding and the lm_head.
# NOTE: only the Qwen3-0.6B and Llama-3.2-1B counts were re-read from their cards.
MODEL_CARD_PARAMS: dict[str, tuple[float, float | None]] = {
    "qwen3-0.6b": (0.6e9, 0.44e9),
    "qwen3-1.7b": (1.7e9, 1.4e9),
    "qwen3-8b": (8.2e9, 6.95e9),
    "llama-3.2-1b": (1.23e9, None),
    "llama-3.1-8b": (8.0e9, None),
}


def write_config(directory: Path, raw: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def small_config(arch: str = "qwen3", layout: str = "v4") -> dict[str, Any]:
    """A minimal valid config.json dict for the test-sized model."""
    raw: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
    }
    if layout == "v4":
        raw.update(rope_theta=10000.0, rope_scaling=None, torch_dtype="float32")
    else:
        raw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
    return raw


# --- parsing checkpoints written by transformers ----------------------------------------


def test_qwen3_fixture_config(qwen3_dir: Path) -> None:
    config = load_config(qwen3_dir)

    assert config.architecture == "qwen3"
    assert config.vocab_size == 256
    assert config.hidden_size == 64
    assert config.intermediate_size == 160
    assert config.num_layers == 2
    assert config.num_heads == 4
    assert config.num_kv_heads == 2
    assert config.head_dim == 16
    assert config.q_size == 64
    assert config.kv_size == 32
    assert config.rms_norm_eps == 1e-6
    assert config.rope == RopeConfig(theta=10000.0)
    assert config.max_positions == 128
    assert config.tie_word_embeddings is False
    assert config.qk_norm is True
    assert config.dtype == "float32"


def test_llama_fixture_config(llama_dir: Path) -> None:
    config = load_config(llama_dir)

    assert config.architecture == "llama"
    assert config.qk_norm is False
    assert config.tie_word_embeddings is True
    assert config.rope == RopeConfig(
        theta=10000.0,
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_positions=32,
    )


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("qwen3", {}),
        ("qwen3", {"dtype": torch.bfloat16, "tie_word_embeddings": True}),
        ("llama", {"rope_scaling": LLAMA3_TEST_ROPE_SCALING, "dtype": torch.float16}),
        ("llama", {"rope_theta": 500000.0}),
    ],
)
def test_v4_and_v5_layouts_agree(tmp_path: Path, arch: str, options: dict[str, Any]) -> None:
    v4_dir = make_checkpoint(tmp_path / "v4", arch, config_layout="v4", **options)
    v5_dir = make_checkpoint(tmp_path / "v5", arch, config_layout="v5", **options)
    v4_raw = json.loads((v4_dir / "config.json").read_text())
    v5_raw = json.loads((v5_dir / "config.json").read_text())

    assert "rope_parameters" not in v4_raw
    assert "torch_dtype" in v4_raw
    assert "rope_parameters" in v5_raw
    assert "dtype" in v5_raw
    assert load_config(v4_dir) == load_config(v5_dir)


def test_v4_layout_loads_in_transformers(tmp_path: Path) -> None:
    # Guards the test helper: the rewritten config must still describe the same model.
    model_dir = make_checkpoint(
        tmp_path, "llama", config_layout="v4", rope_scaling=LLAMA3_TEST_ROPE_SCALING
    )
    model = reference_model(model_dir)

    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize("fixture_name", ["qwen3_dir", "llama_dir"])
def test_num_params_matches_transformers(fixture_name: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture_name)
    model = reference_model(model_dir)

    # parameters() yields a tied weight once, the way num_params counts it.
    expected = sum(p.numel() for p in model.parameters())
    assert load_config(model_dir).num_params == expected


# --- released configs and presets -------------------------------------------------------


def test_released_qwen3_config_matches_preset() -> None:
    assert parse_config(QWEN3_06B_V4, "Qwen3-0.6B/config.json") == get_preset("qwen3-0.6b")


def test_released_llama_config_matches_preset() -> None:
    assert parse_config(LLAMA32_1B_V4, "Llama-3.2-1B/config.json") == get_preset("llama-3.2-1b")


def test_preset_names() -> None:
    assert sorted(PRESETS) == [
        "llama-3.1-8b",
        "llama-3.2-1b",
        "qwen3-0.6b",
        "qwen3-1.7b",
        "qwen3-8b",
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_consistent(name: str) -> None:
    config = get_preset(name)

    assert config.dtype == "bfloat16"
    assert config.num_heads % config.num_kv_heads == 0
    assert config.qk_norm == (config.architecture == "qwen3")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("name", sorted(MODEL_CARD_PARAMS))
def test_preset_param_count_matches_model_card(name: str) -> None:
    config = get_preset(name)
    total, non_embedding = MODEL_CARD_PARAMS[name]
    embedding_tables = 1 if config.tie_word_embeddings else 2
    embedding = embedding_tables * config.vocab_size * config.hidden_size

    # The cards round to two or three significant digits.
    assert config.num_params == pytest.approx(total, rel=0.025)
    if non_embedding is not None:
        assert config.num_params - embedding == pytest.approx(non_embedding, rel=0.025)


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("qwen3-9000b")

    message = str(info.value)
    assert "'qwen3-9000b'" in message
    for name in PRESETS:
        assert name in message


# --- to_dict / from_dict ----------------------------------------------------------------


def test_round_trip_through_json(llama_dir: Path) -> None:
    config = load_config(llama_dir)
    text = json.dumps(config.to_dict())

    assert ModelConfig.from_dict(json.loads(text)) == config


def test_from_dict_missing_key() -> None:
    data = get_preset("qwen3-0.6b").to_dict()
    del data["head_dim"]

    with pytest.raises(ConfigError, match="missing key.*head_dim"):
        ModelConfig.from_dict(data)


def test_from_dict_unknown_key() -> None:
    data = get_preset("qwen3-0.6b").to_dict()
    data["rope"]["scaling"] = 2.0

    with pytest.raises(ConfigError, match="ModelConfig.rope has unknown key.*scaling"):
        ModelConfig.from_dict(data)


def test_model_config_rejects_bad_values() -> None:
    data = get_preset("qwen3-0.6b").to_dict()
    data["num_kv_heads"] = 5

    with pytest.raises(ConfigError, match=r"num_heads \(16\) must be divisible by num_kv_heads \(5\)"):
        ModelConfig.from_dict(data)


# --- defaults ---------------------------------------------------------------------------


def test_llama_head_dim_defaults_to_hidden_over_heads() -> None:
    raw = small_config("llama")
    del raw["head_dim"]

    assert parse_config(raw, "config.json").head_dim == 64 // 4


def test_qwen3_head_dim_defaults_like_transformers() -> None:
    raw = small_config("qwen3")
    del raw["head_dim"]

    assert parse_config(raw, "config.json").head_dim == Qwen3Config().head_dim == 128


def test_kv_heads_default_to_heads() -> None:
    raw = small_config("llama")
    del raw["num_key_value_heads"]

    assert parse_config(raw, "config.json").num_kv_heads == 4


def test_missing_dtype_means_float32() -> None:
    raw = small_config("qwen3")
    del raw["torch_dtype"]

    assert parse_config(raw, "config.json").dtype == "float32"


def test_optional_keys_absent() -> None:
    raw = small_config("llama")
    for key in ("tie_word_embeddings", "attention_bias", "hidden_act"):
        del raw[key]
    config = parse_config(raw, "config.json")

    assert config.tie_word_embeddings is False


def test_model_type_without_architectures() -> None:
    raw = small_config("llama")
    del raw["architectures"]

    assert parse_config(raw, "config.json").architecture == "llama"


def test_v5_theta_at_top_level() -> None:
    raw = small_config("qwen3", layout="v5")
    del raw["rope_parameters"]["rope_theta"]
    raw["rope_theta"] = 5000.0

    assert parse_config(raw, "config.json").rope.theta == 5000.0


def test_legacy_rope_scaling_type_key() -> None:
    raw = small_config("llama")
    raw["rope_scaling"] = {**LLAMA3_TEST_ROPE_SCALING}
    raw["rope_scaling"]["type"] = raw["rope_scaling"].pop("rope_type")

    assert parse_config(raw, "config.json").rope.kind == "llama3"


# --- bad input --------------------------------------------------------------------------


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    message = str(info.value)
    assert str(tmp_path / "config.json") in message
    assert "not found" in message
    assert "Hugging Face config.json" in message


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    message = str(info.value)
    assert str(tmp_path / "config.json") in message
    assert "not valid JSON" in message


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")

    with pytest.raises(ConfigError, match="must contain a JSON object, got list"):
        load_config(tmp_path)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw[key] = value

    return mutate


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        del raw[key]

    return mutate


def _set_rope_scaling(**values: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["rope_scaling"] = {**LLAMA3_TEST_ROPE_SCALING, **values}

    return mutate


def _drop_rope_scaling_key(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["rope_scaling"] = {k: v for k, v in LLAMA3_TEST_ROPE_SCALING.items() if k != key}

    return mutate


# (case id, architecture, mutation of a valid v4 config, substrings the message must contain)
BAD_CONFIGS: list[tuple[str, str, Callable[[dict[str, Any]], None], list[str]]] = [
    (
        "unsupported-architecture",
        "llama",
        _set("architectures", ["MistralForCausalLM"]),
        ["'architectures'", "'MistralForCausalLM'", "not supported", "Qwen3ForCausalLM", "LlamaForCausalLM"],
    ),
    (
        "two-architectures",
        "llama",
        _set("architectures", ["LlamaForCausalLM", "Qwen3ForCausalLM"]),
        ["'architectures'", "exactly one entry"],
    ),
    (
        "unsupported-model-type",
        "llama",
        lambda raw: raw.update(architectures=None, model_type="mistral"),
        ["'model_type'", "'mistral'", "qwen3, llama"],
    ),
    ("missing-vocab-size", "qwen3", _delete("vocab_size"), ["'vocab_size' is missing"]),
    ("missing-hidden-size", "qwen3", _delete("hidden_size"), ["'hidden_size' is missing"]),
    ("missing-intermediate-size", "qwen3", _delete("intermediate_size"), ["'intermediate_size' is missing"]),
    ("missing-num-layers", "qwen3", _delete("num_hidden_layers"), ["'num_hidden_layers' is missing"]),
    ("missing-num-heads", "qwen3", _delete("num_attention_heads"), ["'num_attention_heads' is missing"]),
    ("missing-max-positions", "qwen3", _delete("max_position_embeddings"), ["'max_position_embeddings' is missing"]),
    ("missing-rms-norm-eps", "qwen3", _delete("rms_norm_eps"), ["'rms_norm_eps' is missing"]),
    ("missing-rope-theta", "qwen3", _delete("rope_theta"), ["'rope_theta' is missing"]),
    ("attention-bias", "qwen3", _set("attention_bias", True), ["'attention_bias' is true", "without bias"]),
    ("mlp-bias", "llama", _set("mlp_bias", True), ["'mlp_bias' is true", "without bias"]),
    ("bias-not-bool", "llama", _set("mlp_bias", "no"), ["'mlp_bias'", "true or false", "'no'"]),
    ("gelu", "llama", _set("hidden_act", "gelu"), ["'hidden_act'", "'gelu'", "'silu'"]),
    ("sliding-window", "qwen3", _set("use_sliding_window", True), ["'use_sliding_window' is true", "full attention"]),
    (
        "sliding-layer-type",
        "qwen3",
        _set("layer_types", ["full_attention", "sliding_attention"]),
        ["'layer_types'", "sliding_attention"],
    ),
    (
        "yarn-rope",
        "llama",
        _set("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ["'rope_scaling.rope_type'", "'yarn'", "default, llama3"],
    ),
    (
        "legacy-linear-rope",
        "llama",
        _set("rope_scaling", {"type": "linear", "factor": 2.0}),
        ["'rope_scaling.type'", "'linear'", "default, llama3"],
    ),
    ("rope-scaling-not-object", "llama", _set("rope_scaling", 8.0), ["'rope_scaling'", "object or null"]),
    ("llama3-missing-factor", "llama", _drop_rope_scaling_key("factor"), ["'rope_scaling.factor' is missing"]),
    (
        "llama3-missing-original",
        "llama",
        _drop_rope_scaling_key("original_max_position_embeddings"),
        ["'rope_scaling.original_max_position_embeddings' is missing"],
    ),
    (
        "llama3-low-above-high",
        "llama",
        _set_rope_scaling(low_freq_factor=4.0, high_freq_factor=1.0),
        ["low_freq_factor=4.0", "high_freq_factor=1.0", "'rope_scaling'"],
    ),
    ("llama3-zero-factor", "llama", _set_rope_scaling(factor=0), ["'rope_scaling.factor'", "positive", "0"]),
    (
        "partial-rotary",
        "llama",
        _set("partial_rotary_factor", 0.5),
        ["'partial_rotary_factor'", "0.5", "whole head"],
    ),
    (
        "heads-not-divisible",
        "llama",
        _set("num_key_value_heads", 3),
        ["num_attention_heads (4)", "not divisible", "num_key_value_heads (3)"],
    ),
    ("zero-hidden-size", "qwen3", _set("hidden_size", 0), ["'hidden_size'", "positive integer", "got 0"]),
    ("negative-layers", "qwen3", _set("num_hidden_layers", -1), ["'num_hidden_layers'", "positive integer", "got -1"]),
    ("string-vocab-size", "qwen3", _set("vocab_size", "256"), ["'vocab_size'", "positive integer", "got '256'"]),
    ("bool-head-dim", "qwen3", _set("head_dim", True), ["'head_dim'", "positive integer", "got True"]),
    ("zero-kv-heads", "qwen3", _set("num_key_value_heads", 0), ["'num_key_value_heads'", "got 0"]),
    ("zero-eps", "qwen3", _set("rms_norm_eps", 0.0), ["'rms_norm_eps'", "positive number"]),
    ("negative-theta", "qwen3", _set("rope_theta", -1.0), ["'rope_theta'", "positive number", "-1.0"]),
    ("odd-head-dim", "qwen3", _set("head_dim", 15), ["head_dim is 15", "even"]),
    ("int8-dtype", "qwen3", _set("torch_dtype", "int8"), ["'torch_dtype'", "'int8'", "float32, bfloat16, float16"]),
]


@pytest.mark.parametrize(
    ("arch", "mutate", "expected"),
    [case[1:] for case in BAD_CONFIGS],
    ids=[case[0] for case in BAD_CONFIGS],
)
def test_bad_config_raises(
    tmp_path: Path,
    arch: str,
    mutate: Callable[[dict[str, Any]], None],
    expected: list[str],
) -> None:
    raw = small_config(arch)
    mutate(raw)
    write_config(tmp_path, raw)

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    message = str(info.value)
    assert str(tmp_path / "config.json") in message
    for fragment in expected:
        assert fragment in message


def test_v5_unsupported_rope_type() -> None:
    raw = small_config("llama", layout="v5")
    raw["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}

    with pytest.raises(ConfigError) as info:
        parse_config(raw, "/models/x/config.json")

    message = str(info.value)
    assert "/models/x/config.json" in message
    assert "'rope_parameters.rope_type'" in message
    assert "'dynamic'" in message


def test_v5_missing_rope_theta() -> None:
    raw = small_config("qwen3", layout="v5")
    del raw["rope_parameters"]["rope_theta"]

    with pytest.raises(ConfigError, match=r"'rope_parameters\.rope_theta' is missing"):
        parse_config(raw, "config.json")


def test_v5_bad_dtype() -> None:
    raw = small_config("qwen3", layout="v5")
    raw["dtype"] = "float8_e4m3fn"

    with pytest.raises(ConfigError, match=r"'dtype' is 'float8_e4m3fn'"):
        parse_config(raw, "config.json")


def test_missing_architectures_and_model_type() -> None:
    raw = small_config("qwen3")
    del raw["architectures"]
    del raw["model_type"]

    with pytest.raises(ConfigError) as info:
        parse_config(raw, "config.json")

    message = str(info.value)
    assert "'architectures' is missing" in message
    assert "Qwen3ForCausalLM" in message
