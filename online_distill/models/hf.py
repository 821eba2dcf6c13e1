"""Hugging Face `transformers` models as peers, students and teachers (classifiers, and causal
language models through `causal_lm(...)`).

Our loop calls `model(x)` with a batch of token ids and wants logits (B, num_classes) back; a
`transformers` sequence-classification model takes keyword arguments and returns an output
object. `HFClassifier` is the adapter between them, and `sequence_classifier(...)` makes a
model builder of it for `train(cfg, models={...})`:

    from transformers import AutoConfig, AutoTokenizer
    from online_distill import train
    from online_distill.data import Splits, TokenTensors
    from online_distill.models import hf

    tok = AutoTokenizer.from_pretrained("prajjwal1/bert-tiny")
    def my_texts(data_cfg):
        return Splits(TokenTensors(hf.tokenize(tok, train_texts, 64), torch.tensor(train_labels)),
                      TokenTensors(hf.tokenize(tok, test_texts, 64), torch.tensor(test_labels)), num_classes=4)
    models = {"bert_tiny": hf.sequence_classifier(pretrained="prajjwal1/bert-tiny", pad_token_id=tok.pad_token_id)}
    train(cfg, models=models, datasets={"my_texts": my_texts})

A builder made from a config (`sequence_classifier(BertConfig(...))`) starts from random
weights and downloads nothing. `transformers` is imported only when a model is built.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class HFClassifier(nn.Module):
    """model(token_ids) -> logits, for a `transformers` *ForSequenceClassification model. The
    attention mask is where the ids are not `pad_token_id`, so padding is never attended to."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0):
        super().__init__()
        self.model, self.pad_token_id = model, pad_token_id

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def sequence_classifier(config: Any = None, *, pretrained: str | None = None, pad_token_id: int = 0):
    """A model builder `(input_shape, num_classes) -> HFClassifier` for token ids of shape (L,).

    config: a `transformers` config (e.g. BertConfig(...)): a randomly initialised model of it.
    pretrained: a model name or directory for AutoModelForSequenceClassification.from_pretrained;
    its classification head is made anew with num_classes outputs.
    pad_token_id: the id the dataset pads with (a tokenizer's `pad_token_id`; 0 for our byte ids).
    """
    if (config is None) == (pretrained is None):
        raise ValueError("sequence_classifier: give a config or pretrained, one of them")

    def build(input_shape: tuple[int, ...], num_classes: int) -> HFClassifier:
        from transformers import AutoModelForSequenceClassification

        if len(input_shape) != 1:
            raise ValueError(f"a sequence classifier takes token ids of shape (L,); got examples of shape {input_shape}")
        if pretrained is not None:
            model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=num_classes,
                                                                       ignore_mismatched_sizes=True)
        else:
            cfg = copy.deepcopy(config)
            cfg.num_labels = num_classes
            limit = getattr(cfg, "max_position_embeddings", None)
            if limit is not None and input_shape[0] > limit:
                raise ValueError(f"sequences of {input_shape[0]} tokens are longer than the config's "
                                 f"max_position_embeddings={limit}")
            model = AutoModelForSequenceClassification.from_config(cfg)
        return HFClassifier(model, pad_token_id)

    build.__qualname__ = f"hf.sequence_classifier({pretrained or type(config).__name__})"
    return build


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> Tensor:
    """(N, max_length) int64 token ids of `texts`, cut and padded to max_length with the
    tokenizer's pad id: what TokenTensors holds and HFClassifier reads."""
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return enc["input_ids"].to(torch.int64)


# ---- causal language models --------------------------------------------------------------------

class HFCausalLM(nn.Module):
    """model(token_ids (B, L)) -> next-token logits (B, L, V), for a `transformers`
    *ForCausalLM model: logits[:, t] predicts token t + 1. The attention mask is where the ids
    are not `pad_token_id`; sequences are left-aligned (padding at the right), so no real position
    ever sees padding and the positions count from 0 at each sequence's first token."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0, max_positions: int | None = None):
        super().__init__()
        self.model, self.pad_token_id, self.max_positions = model, pad_token_id, max_positions

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.max_positions is not None and input_ids.shape[-1] > self.max_positions:
            raise ValueError(f"a sequence of {input_ids.shape[-1]} tokens is longer than the model's "
                             f"{self.max_positions} positions")
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def _max_positions(cfg: Any) -> int | None:
    # GPT-2 calls it n_positions (and maps max_position_embeddings to it); most others the latter
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def causal_lm(config: Any = None, *, pretrained: str | None = None, pad_token_id: int = 0):
    """A model builder `(input_shape, num_classes) -> HFCausalLM` for token ids of shape (L,).

    config: a `transformers` config (e.g. GPT2Config(...)): a randomly initialised model of it.
    pretrained: a model name or directory for AutoModelForCausalLM.from_pretrained.
    The model's vocabulary must be the dataset's num_classes (teacher and student share one), and
    L at most its positions: either is refused with one line naming both sizes.
    pad_token_id: the id the dataset pads with (0 for our byte ids).
    """
    if (config is None) == (pretrained is None):
        raise ValueError("causal_lm: give a config or pretrained, one of them")

    def build(input_shape: tuple[int, ...], num_classes: int) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        if len(input_shape) != 1:
            raise ValueError(f"a causal language model takes token ids of shape (L,); got examples of shape {input_shape}")
        cfg = copy.deepcopy(config) if pretrained is None else None
        if cfg is not None:
            _check_sizes(cfg, input_shape[0], num_classes)
            model = AutoModelForCausalLM.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_pretrained(pretrained)
            cfg = model.config
            _check_sizes(cfg, input_shape[0], num_classes)
        return HFCausalLM(model, pad_token_id, _max_positions(cfg))

    build.__qualname__ = f"hf.causal_lm({pretrained or type(config).__name__})"
    return build


def _check_sizes(cfg: Any, length: int, num_classes: int) -> None:
    if cfg.vocab_size != num_classes:
        raise ValueError(f"the model's vocabulary has {cfg.vocab_size} tokens but the dataset has num_classes="
                         f"{num_classes}; allowed: the same vocabulary (vocab_size = num_classes)")
    limit = _max_positions(cfg)
    if limit is not None and length > limit:
        raise ValueError(f"sequences of {length} tokens are longer than the model's {limit} positions")
