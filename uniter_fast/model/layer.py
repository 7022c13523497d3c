"""BERT-style post-LN transformer layers for UNITER, calling only :mod:`uniter_fast.ops`.

Module and parameter names follow UNITER's ``model/layer.py`` exactly, so its
checkpoints load unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..constants import LAYER_NORM_EPS


def gelu(x: torch.Tensor) -> torch.Tensor:
    return ops.gelu(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


ACT2FN = {"gelu": gelu, "relu": F.relu, "swish": swish}


class GELU(nn.Module):
    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return ops.gelu(input_)


class LayerNorm(nn.Module):
    """Layer norm with UNITER's parameter names (``weight``, ``bias``), through ops.layer_norm."""

    def __init__(self, hidden_size: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


BertLayerNorm = LayerNorm


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """attention_mask: [batch, seq], 1 = real token."""
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        ctx = ops.attention(q, k, v, attention_mask,
                            dropout_p=self.dropout_p if self.training else 0.0)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


def select_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden`` [..., H] flattened to rows, the rows ``rows`` (flat indices): [n, H].
    A gather, so the same values and gradients as boolean-mask indexing."""
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, input_tensor, attention_mask, rows=None):
        """``rows`` (flat indices into [batch * seq]): every position is attended to,
        but only those rows go on through the output projection: returns [n, H]."""
        ctx = self.self(input_tensor, attention_mask)
        if rows is not None:
            ctx, input_tensor = select_rows(ctx, rows), select_rows(input_tensor, rows)
        return self.output(ctx, input_tensor)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask, rows=None):
        """[B, S, H] -> [B, S, H]; with ``rows`` (flat indices into [B * S]) only those
        rows after the attention: [n, H] (see :class:`BertAttention`)."""
        attention_output = self.attention(hidden_states, attention_mask, rows)
        return self.output(self.intermediate(attention_output), attention_output)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden_states):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """MLM decoder whose weight *is* the word-embedding matrix (tied)."""

    def __init__(self, config, bert_model_embedding_weights: nn.Parameter):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(bert_model_embedding_weights.size(1),
                                 bert_model_embedding_weights.size(0), bias=False)
        self.decoder.weight = bert_model_embedding_weights
        self.bias = nn.Parameter(torch.zeros(bert_model_embedding_weights.size(0)))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config, bert_model_embedding_weights):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, bert_model_embedding_weights)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)
