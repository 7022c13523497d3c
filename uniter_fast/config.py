"""UniterConfig: UNITER's model configuration, compatible with its JSON files."""
import copy
import json
import os
from typing import Any, Dict, Union

_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
    initializer_range=0.02,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(name: str) -> str:
    """Path of a shipped config: "uniter-base", "uniter-large" or "uniter-tiny"."""
    p = os.path.join(CONFIG_DIR, name if name.endswith(".json") else name + ".json")
    if not os.path.exists(p):
        raise ValueError(f"no shipped config {name!r}; have {sorted(os.listdir(CONFIG_DIR))}")
    return p


class UniterConfig:
    """Configuration of a UNITER model.

    Built like the original: ``UniterConfig(vocab_size)`` with keyword
    arguments, ``UniterConfig("uniter-base.json")`` (a JSON file path),
    ``UniterConfig.from_dict(d)`` or ``UniterConfig.from_json_file(path)``;
    also ``UniterConfig(**kwargs)`` and ``UniterConfig.from_pretrained_name("uniter-base")``.
    Unknown keys from a JSON file are kept as attributes, as in the original.
    """

    def __init__(self, vocab_size_or_config_json_file: Union[int, str, None] = None, **kwargs):
        self.__dict__.update(copy.deepcopy(_DEFAULTS))
        if isinstance(vocab_size_or_config_json_file, str):
            with open(vocab_size_or_config_json_file, "r", encoding="utf-8") as f:
                self.__dict__.update(json.load(f))
        elif isinstance(vocab_size_or_config_json_file, int):
            self.vocab_size = vocab_size_or_config_json_file
        elif vocab_size_or_config_json_file is not None:
            raise ValueError("first argument must be a vocabulary size (int) or the path "
                             "to a config JSON file (str)")
        self.__dict__.update(kwargs)
        self.validate()

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < (0 if key == "num_hidden_layers" else 1):
                raise ValueError(f"config {key} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ("gelu", "relu", "swish"):
            raise ValueError(f"hidden_act must be gelu, relu or swish, got {self.hidden_act!r}")

    @classmethod
    def from_dict(cls, json_object: Dict[str, Any]) -> "UniterConfig":
        return cls(None, **json_object)

    @classmethod
    def from_json_file(cls, json_file: str) -> "UniterConfig":
        with open(json_file, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained_name(cls, name: str) -> "UniterConfig":
        return cls.from_json_file(config_path(name))

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return self.to_json_string()

    def __eq__(self, other) -> bool:
        return isinstance(other, UniterConfig) and self.to_dict() == other.to_dict()
