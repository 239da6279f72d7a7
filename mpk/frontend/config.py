"""Model configuration of a Qwen3 or Llama decoder, read from a Hugging Face config.json.

parse_config accepts both layouts in use: the one transformers 4.x wrote (top-level
`rope_theta`, `rope_scaling`, `torch_dtype`), which most released checkpoints carry, and
the one transformers 5 writes (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mpk.errors import ConfigError

# Hugging Face `architectures` entry -> ModelConfig.architecture.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_KINDS: tuple[str, ...] = ("default", "llama3")

# Qwen3Config gives head_dim a fixed default of 128 (transformers 4.51 and 5.25), while
# LlamaConfig derives it from hidden_size // num_attention_heads. A config.json without
# head_dim must resolve the way transformers resolves it, or the weights will not fit.
_QWEN3_DEFAULT_HEAD_DIM = 128

@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    The llama3 fields are used only when kind is "llama3". Their defaults are the values
    that Llama 3.1 ships with, apart from factor, which defaults to no scaling.
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in SUPPORTED_ROPE_KINDS:
            raise ConfigError(
                f"RoPE kind {self.kind!r} is not supported. "
                f"Use one of: {', '.join(SUPPORTED_ROPE_KINDS)}."
            )
        if not self.theta > 0:
            raise ConfigError(f"RoPE theta must be positive, got {self.theta}.")
        if self.kind == "llama3":
            _check_llama3_rope(self)


def _check_llama3_rope(rope: RopeConfig) -> None:
    if not rope.factor > 0:
        raise ConfigError(f"llama3 RoPE factor must be positive, got {rope.factor}.")
    if not 0 < rope.low_freq_factor < rope.high_freq_factor:
        # The smoothing step divides by high_freq_factor - low_freq_factor.
        raise ConfigError(
            "llama3 RoPE needs 0 < low_freq_factor < high_freq_factor, got "
            f"low_freq_factor={rope.low_freq_factor}, high_freq_factor={rope.high_freq_factor}."
        )
    if rope.original_max_positions <= 0:
        raise ConfigError(
            "llama3 RoPE original_max_positions must be positive, "
            f"got {rope.original_max_positions}."
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only model, independent of the config.json layout."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_positions: int
    tie_word_embeddings: bool
    qk_norm: bool
    dtype: str

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported. "
                f"Use one of: {', '.join(SUPPORTED_ARCHITECTURES.values())}."
            )
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.num_kv_heads})."
            )
        if not isinstance(self.rope, RopeConfig):
            raise ConfigError(
                f"ModelConfig.rope must be a RopeConfig, got {type(self.rope).__name__}."
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        if not self.rms_norm_eps > 0:
            raise ConfigError(
                f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}."
            )
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(
                f"ModelConfig.dtype {self.dtype!r} is not supported. "
                f"Use one of: {', '.join(SUPPORTED_DTYPES)}."
            )

    @property
    def q_size(self) -> int:
        """Width of the query projection output: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key and of the value projection output: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Number of weights, counting a tied embedding once, as transformers' model does."""
        attention = 2 * self.hidden_size * self.q_size + 2 * self.hidden_size * self.kv_size
        if self.qk_norm:
            attention += 2 * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer_norms = 2 * self.hidden_size
        per_layer = attention + mlp + layer_norms

        embeddings = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        final_norm = self.hidden_size
        return embeddings + lm_head + final_norm + self.num_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict that from_dict turns back into an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build a ModelConfig from the output of to_dict, rejecting missing or unknown keys."""
        values = _take_fields(cls, d, "ModelConfig")
        values["rope"] = RopeConfig(**_take_fields(RopeConfig, values["rope"], "ModelConfig.rope"))
        return cls(**values)


_POSITIVE_INT_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_positions",
)


def _take_fields(cls: type, d: Any, label: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{label} must be a dict, got {type(d).__name__}.")
    names = {f.name for f in fields(cls)}
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    missing = sorted(required - d.keys())
    unknown = sorted(d.keys() - names)
    if missing:
        raise ConfigError(
            f"{label} is missing key(s) {missing}. Pass the dict that to_dict returned."
        )
    if unknown:
        raise ConfigError(f"{label} has unknown key(s) {unknown}. Expected keys: {sorted(names)}.")
    return dict(d)


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"hidden_size": true` is a broken config, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate model_dir/config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found. The model directory must contain the Hugging Face "
            "config.json that was saved with the checkpoint."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}). Restore the file from the original checkpoint."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} could not be read ({err}). Check the file's permissions."
        ) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must contain a JSON object, got {type(raw).__name__}.")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], source: str) -> ModelConfig:
    """Validate the contents of a Hugging Face config.json and convert them to a ModelConfig.

    source names the file in error messages. Raises ConfigError for keys that are missing,
    mistyped or describe a feature mpk does not implement (biases, activations other than
    SiLU, sliding-window attention, RoPE types other than default and llama3).
    """
    reader = _Reader(raw, source)
    architecture = _parse_architecture(reader)

    _reject_unsupported_features(reader, architecture)

    num_heads = reader.positive_int("num_attention_heads")
    num_kv_heads = reader.positive_int("num_key_value_heads", default=num_heads)
    if num_heads % num_kv_heads != 0:
        raise ConfigError(
            f"{source}: num_attention_heads ({num_heads}) is not divisible by "
            f"num_key_value_heads ({num_kv_heads}), so query heads cannot be grouped over "
            "the key/value heads. Check both values against the original checkpoint."
        )
    hidden_size = reader.positive_int("hidden_size")
    if architecture == "qwen3":
        head_dim = reader.positive_int("head_dim", default=_QWEN3_DEFAULT_HEAD_DIM)
    elif reader.has("head_dim"):
        head_dim = reader.positive_int("head_dim")
    elif hidden_size >= num_heads:
        head_dim = hidden_size // num_heads
    else:
        raise reader.error(
            "head_dim",
            f"is missing and hidden_size ({hidden_size}) < num_attention_heads ({num_heads})",
            "Add head_dim from the original checkpoint.",
        )
    if head_dim % 2 != 0:
        raise ConfigError(
            f"{source}: head_dim is {head_dim}, but RoPE needs an even head_dim. "
            "Check head_dim against the original checkpoint."
        )

    return ModelConfig(
        architecture=architecture,
        vocab_size=reader.positive_int("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=reader.positive_int("intermediate_size"),
        num_layers=reader.positive_int("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=reader.positive_float("rms_norm_eps"),
        rope=_parse_rope(reader),
        max_positions=reader.positive_int("max_position_embeddings"),
        tie_word_embeddings=reader.bool("tie_word_embeddings", default=False),
        qk_norm=architecture == "qwen3",
        dtype=_parse_dtype(reader),
    )


class _Reader:
    """Typed access to one JSON object, with errors that name the file and the key."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str = "") -> None:
        self.raw = raw
        self.source = source
        self.prefix = prefix

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.source}: key '{self.prefix}{key}' {problem}. {fix}")

    def get(self, key: str) -> Any:
        if key not in self.raw:
            raise self.error(
                key, "is missing", "Add it with the value from the model's original config.json."
            )
        return self.raw[key]

    def positive_int(self, key: str, default: int | None = None) -> int:
        if default is not None and not self.has(key):
            return default
        value = self.get(key)
        if not _is_int(value) or value <= 0:
            raise self.error(key, f"must be a positive integer, got {value!r}", "Fix the value.")
        return value

    def positive_float(self, key: str) -> float:
        value = self.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise self.error(key, f"must be a positive number, got {value!r}", "Fix the value.")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.raw[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}", "Fix the value.")
        return value


def _parse_architecture(reader: _Reader) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if reader.raw.get("model_type") == "bert":
        raise ConfigError(
            f"{reader.source}: this is a BERT encoder, not a decoder that generates text; embed "
            "sentences with it instead: mpk embed MODEL_DIR \"a sentence\""
        )
    architectures = reader.raw.get("architectures")
    if architectures is None:
        model_type = reader.raw.get("model_type")
        if model_type is None:
            raise reader.error(
                "architectures",
                "is missing and so is 'model_type'",
                f'Add "architectures": ["<one of {supported}>"].',
            )
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise reader.error(
                "model_type",
                f"is {model_type!r}, which is not supported",
                f"Supported model types: {', '.join(SUPPORTED_ARCHITECTURES.values())}.",
            )
        return model_type

    if not isinstance(architectures, list) or len(architectures) != 1:
        raise reader.error(
            "architectures",
            f"must be a list with exactly one entry, got {architectures!r}",
            f"Supported architectures: {supported}.",
        )
    name = architectures[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise reader.error(
            "architectures",
            f"names {name!r}, which is not supported",
            f"Supported architectures: {supported}.",
        )
    return SUPPORTED_ARCHITECTURES[name]


def _reject_unsupported_features(reader: _Reader, architecture: str) -> None:
    for key in ("attention_bias", "mlp_bias"):
        if reader.bool(key, default=False):
            raise reader.error(
                key,
                "is true",
                "mpk supports only projections without bias, as in the released Qwen3 and "
                "Llama models.",
            )

    hidden_act = reader.raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise reader.error(
            "hidden_act",
            f"is {hidden_act!r}",
            "mpk supports only 'silu' (the SwiGLU MLP of Qwen3 and Llama).",
        )

    if architecture == "qwen3" and reader.bool("use_sliding_window", default=False):
        raise reader.error(
            "use_sliding_window",
            "is true",
            "mpk supports only full attention in every layer.",
        )
    layer_types = reader.raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise reader.error(
                "layer_types", f"must be a list, got {layer_types!r}", "Fix the value."
            )
        other = sorted({t for t in layer_types if t != "full_attention"}, key=str)
        if other:
            raise reader.error(
                "layer_types",
                f"contains {other}",
                "mpk supports only 'full_attention' layers.",
            )


def _parse_rope(reader: _Reader) -> RopeConfig:
    rope_parameters = reader.raw.get("rope_parameters")
    if rope_parameters is not None:
        # transformers 5 layout: theta and scaling in one dict.
        if not isinstance(rope_parameters, dict):
            raise reader.error(
                "rope_parameters", f"must be an object, got {rope_parameters!r}", "Fix the value."
            )
        params = _Reader(rope_parameters, reader.source, prefix="rope_parameters.")
        if not params.has("rope_theta") and reader.has("rope_theta"):
            theta = reader.positive_float("rope_theta")
        else:
            theta = params.positive_float("rope_theta")
    else:
        # transformers 4.x layout: top-level theta, optional rope_scaling (null for default RoPE).
        theta = reader.positive_float("rope_theta")
        scaling = reader.raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise reader.error(
                "rope_scaling", f"must be an object or null, got {scaling!r}", "Fix the value."
            )
        params = _Reader(scaling or {}, reader.source, prefix="rope_scaling.")

    # `type` is the older spelling of `rope_type`, which transformers 5 still accepts.
    type_key = "rope_type" if params.has("rope_type") else "type"
    kind = params.raw.get(type_key) or "default"
    if kind not in SUPPORTED_ROPE_KINDS:
        raise params.error(
            type_key,
            f"is {kind!r}, which is not supported",
            f"Supported RoPE types: {', '.join(SUPPORTED_ROPE_KINDS)}.",
        )

    for scope in (reader, params):
        if scope.has("partial_rotary_factor") and scope.raw["partial_rotary_factor"] != 1.0:
            raise scope.error(
                "partial_rotary_factor",
                f"is {scope.raw['partial_rotary_factor']!r}",
                "mpk supports only RoPE over the whole head (partial_rotary_factor 1.0).",
            )

    if kind == "default":
        return RopeConfig(theta=theta)

    factor = params.positive_float("factor")
    low_freq_factor = params.positive_float("low_freq_factor")
    high_freq_factor = params.positive_float("high_freq_factor")
    original_max_positions = params.positive_int("original_max_position_embeddings")
    try:
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=factor,
            low_freq_factor=low_freq_factor,
            high_freq_factor=high_freq_factor,
            original_max_positions=original_max_positions,
        )
    except ConfigError as err:
        section = params.prefix.rstrip(".")
        raise ConfigError(f"{reader.source}: {err} Fix the values in '{section}'.") from err


def _parse_dtype(reader: _Reader) -> str:
    # transformers 5 writes `dtype`, 4.x wrote `torch_dtype`. No entry means float32,
    # which is what transformers loads such a checkpoint as.
    key = "dtype" if reader.has("dtype") else "torch_dtype"
    value = reader.raw.get(key)
    if value is None:
        return "float32"
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in SUPPORTED_DTYPES:
        raise reader.error(
            key,
            f"is {value!r}, which is not supported",
            f"Supported dtypes: {', '.join(SUPPORTED_DTYPES)}.",
        )
    return name
