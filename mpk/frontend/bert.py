"""Configuration of a BERT sentence encoder: the Hugging Face config.json of a BertModel
and the sentence-transformers files beside it (modules.json, the pooling module's
config.json, sentence_bert_config.json), which define how token rows become one embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpk.errors import ConfigError

BERT_ARCHITECTURES = ("BertModel",)

# sentence-transformers module types that mpk runs, by the role they play.
_TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class BertConfig:
    """Shape and numerics of a BERT encoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pooling:
    """Pooling settings: how sentence-transformers turns token rows into one embedding."""

    mode: str              # "mean" over the sentence's rows, or "cls" (its first row)
    normalize: bool        # divide by the L2 norm afterwards
    max_seq_length: int    # tokens per sentence, [CLS] and [SEP] included; longer input is truncated


def load_bert_config(model_dir: str | Path) -> BertConfig:
    """Read and validate model_dir/config.json of a BertModel."""
    path = Path(model_dir) / "config.json"
    raw = _read_json(path, "the Hugging Face config.json that was saved with the checkpoint")
    return parse_bert_config(raw, str(path))


def parse_bert_config(raw: dict[str, Any], source: str) -> BertConfig:
    """Validate a BERT config.json; raise ConfigError naming the key and the fix."""
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "bert" or any(a not in BERT_ARCHITECTURES for a in architectures):
        raise ConfigError(
            f"{source}: model_type {raw.get('model_type')!r} with architectures {architectures} is not a BERT "
            f"encoder; mpk embed runs {', '.join(BERT_ARCHITECTURES)} checkpoints (model_type 'bert')"
        )
    _expect(raw, source, "hidden_act", "gelu", "mpk runs the exact (erf) GELU of BERT; other activations are not implemented")
    _expect(raw, source, "position_embedding_type", "absolute", "mpk implements absolute position embeddings only")
    for key in ("is_decoder", "add_cross_attention"):
        if raw.get(key):
            raise ConfigError(f"{source}: key '{key}' is true; mpk runs BERT as a bidirectional encoder only")
    cfg = BertConfig(
        vocab_size=_positive_int(raw, source, "vocab_size"),
        hidden_size=_positive_int(raw, source, "hidden_size"),
        intermediate_size=_positive_int(raw, source, "intermediate_size"),
        num_layers=_positive_int(raw, source, "num_hidden_layers"),
        num_heads=_positive_int(raw, source, "num_attention_heads"),
        max_positions=_positive_int(raw, source, "max_position_embeddings"),
        type_vocab_size=_positive_int(raw, source, "type_vocab_size", default=2),
        layer_norm_eps=_positive_float(raw, source, "layer_norm_eps", default=1e-12),
        pad_token_id=int(raw.get("pad_token_id") or 0),
    )
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                          f"{cfg.num_heads}; check both against the original checkpoint")
    return cfg


def load_pooling(model_dir: str | Path, cfg: BertConfig) -> Pooling:
    """Read the sentence-transformers pipeline of model_dir. Without modules.json the
    model is a plain BertModel, which sentence-transformers would mean-pool without
    normalizing.
    """
    model_dir = Path(model_dir)
    modules_path = model_dir / "modules.json"
    mode, normalize = "mean", False
    if modules_path.is_file():
        modules = _read_json(modules_path, "the sentence-transformers module list")
        if not isinstance(modules, list):
            raise ConfigError(f"{modules_path}: expected a JSON list of modules, got {type(modules).__name__}")
        mode, normalize = _pipeline(modules, model_dir, modules_path)
    max_seq_length = _max_seq_length(model_dir, cfg)
    return Pooling(mode, normalize, max_seq_length)


def _pipeline(modules: list, model_dir: Path, source: Path) -> tuple[str, bool]:
    types = [m.get("type") if isinstance(m, dict) else None for m in modules]
    unknown = [t for t in types if t not in (_TRANSFORMER_MODULE, _POOLING_MODULE, _NORMALIZE_MODULE)]
    if unknown:
        raise ConfigError(f"{source}: module types {unknown} are not supported; mpk runs Transformer, Pooling and "
                          "Normalize modules only")
    if types[:1] != [_TRANSFORMER_MODULE] or types.count(_POOLING_MODULE) != 1:
        raise ConfigError(f"{source}: expected a Transformer module followed by one Pooling module, got {types}")
    pooling = modules[types.index(_POOLING_MODULE)]
    pooling_path = model_dir / str(pooling.get("path", "")) / "config.json"
    settings = _read_json(pooling_path, "the Pooling module's configuration")
    enabled = sorted(k for k, v in settings.items() if k.startswith("pooling_mode") and v)
    modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(enabled) != 1 or enabled[0] not in modes:
        raise ConfigError(f"{pooling_path}: pooling modes {enabled} are not supported; mpk implements exactly one of "
                          f"{', '.join(modes)}")
    return modes[enabled[0]], _NORMALIZE_MODULE in types[types.index(_POOLING_MODULE):]


def _max_seq_length(model_dir: Path, cfg: BertConfig) -> int:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length,
    never more than the position table allows.
    """
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = model_dir / name
        if path.is_file():
            value = _read_json(path, "").get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return min(value, cfg.max_positions)
    return cfg.max_positions


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path} not found; the model directory must contain {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path} could not be read as JSON ({err}); restore it from the original model") from err


def _expect(raw: dict, source: str, key: str, value: str, why: str) -> None:
    found = raw.get(key, value)
    if found != value:
        raise ConfigError(f"{source}: key '{key}' is {found!r}, expected {value!r}: {why}")


def _positive_int(raw: dict, source: str, key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: key '{key}' must be a positive integer, got {value!r}; fix the value")
    return value


def _positive_float(raw: dict, source: str, key: str, default: float) -> float:
    value = raw.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{source}: key '{key}' must be a positive number, got {value!r}; fix the value")
    return float(value)
