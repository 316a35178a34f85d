"""Trainer `pretrain`: next-token prediction, masked by segment (padding never counts).

The loss goes from the final hidden states straight to a chunked cross-entropy
(`losses.cross_entropy`), so `[batch, seq, vocab]` logits are never stored.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from ministral_jax.model import transformer, vision
from ministral_jax.model.config import ModelConfig
from ministral_jax.train import loop, losses


def loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(seq_chunk=512, vocab_chunk=8192))


def hidden_and_head(model_cfg: ModelConfig, params, batch: dict, module=None):
  """Final hidden states `[batch, seq, d_model]` and the LM head `[d_model, vocab]` in compute dtype.
  `module` replaces the plain decoder (e.g. its fp8 training version, `model/fp8.py`). A batch with image
  patches (SFT on conversations with images) feeds them to the ViT."""
  hidden, _ = (module or transformer.Transformer(model_cfg)).apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True,
      images=vision.from_batch(batch))
  return hidden, transformer.output_matrix(params, model_cfg).astype(hidden.dtype)


def token_mask(batch: dict):
  """The targets that count: every real token, or only those a batch marks (`loss_mask`: SFT's assistant
  tokens)."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(jnp.float32) * (batch["segment_ids"] != 0)
  return (batch["segment_ids"] != 0).astype(jnp.float32)


def make_loss(model_cfg: ModelConfig, loss_cfg: ml_collections.ConfigDict, module=None) -> loop.LossFn:
  """Next-token loss: (params, batch, frozen, rng) -> (loss_sum, tokens, aux)."""
  chunks = dict(seq_chunk=loss_cfg.seq_chunk, vocab_chunk=loss_cfg.vocab_chunk)

  def loss_fn(params, batch, frozen, rng):
    del frozen, rng
    hidden, head = hidden_and_head(model_cfg, params, batch, module)
    loss_sum, count = losses.cross_entropy(hidden, head, batch["targets"], token_mask(batch), **chunks)
    return loss_sum, count, {}
  return loss_fn


def make_task(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, partitioner) -> loop.Task:
  del partitioner
  return loop.Task("pretrain", make_loss(model_cfg, cfg.loss))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  return loop.run(cfg, workdir, make_task)
