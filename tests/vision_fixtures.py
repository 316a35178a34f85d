"""Tiny random transformers multimodal models (Mistral3ForConditionalGeneration: Pixtral ViT + projector +
Ministral3 decoder) and the matching inputs, shared by the vision tests.

Sizes keep what makes the real model different: a vision width unlike the
text width, several heads (2D RoPE per head), images of different sizes in
one batch, and YaRN + query temperature on the text side.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from ministral_jax.model import config

VOCAB, D_MODEL, D_FFN, LAYERS, L0 = 512, 64, 128, 2, 32
V_D, V_HEADS, V_FFN, V_LAYERS, PATCH = 32, 2, 64, 2, 4
IMG, BREAK, END = 10, 12, 13
TOL = 1e-4  # fp32 on both sides; a few accumulated matmuls of width <= 128 stay far below this


def our_config(**overrides) -> config.ModelConfig:
  return config.preset("tiny", vocab_size=VOCAB, vision_layers=V_LAYERS, vision_d_model=V_D,
                       vision_heads=V_HEADS, vision_d_ffn=V_FFN, vision_patch_size=PATCH,
                       vision_image_size=64, **overrides)


def hf_config(tied: bool = False, projector_bias: bool = False) -> Mistral3Config:
  rope = dict(type="yarn", rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=L0,
              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
  text = dict(model_type="ministral3", vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FFN,
              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=4 * L0, tie_word_embeddings=tied, rope_parameters=rope)
  vision = dict(model_type="pixtral", hidden_size=V_D, intermediate_size=V_FFN, num_hidden_layers=V_LAYERS,
                num_attention_heads=V_HEADS, patch_size=PATCH, image_size=64, num_channels=3,
                hidden_act="silu", rope_parameters=dict(rope_type="axial", rope_theta=10000.0))
  return Mistral3Config(text_config=text, vision_config=vision, image_token_id=IMG, spatial_merge_size=2,
                        projector_hidden_act="gelu", multimodal_projector_bias=projector_bias,
                        vision_feature_layer=-1, tie_word_embeddings=tied)


def make_hf_model(seed: int = 0, **kwargs) -> Mistral3ForConditionalGeneration:
  """Random weights in eval mode; norms randomised so that a swapped or missing norm shows."""
  torch.manual_seed(seed)
  model = Mistral3ForConditionalGeneration(hf_config(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_pre" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0, 0.1)
  return model


def images(seed: int = 0, sizes=((16, 24), (8, 8))) -> list[np.ndarray]:
  """Normalised-looking pixels `[3, H, W]`, sides multiples of 2 * PATCH."""
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(3, h, w)).astype(np.float32) for h, w in sizes]


def image_layout(pixels: np.ndarray) -> list[int]:
  """The `[IMG]`... `[IMG_BREAK]` ... `[IMG_END]` tokens of one image."""
  rows, cols = pixels.shape[1] // (2 * PATCH), pixels.shape[2] // (2 * PATCH)
  out: list[int] = []
  for r in range(rows):
    out += [IMG] * cols + [END if r == rows - 1 else BREAK]
  return out


def hf_pixel_batch(pixels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
  """Zero-padded `[n, 3, H_max, W_max]` and `image_sizes` `[n, 2]`, as the HF processor batches them."""
  h = max(p.shape[1] for p in pixels)
  w = max(p.shape[2] for p in pixels)
  batch = np.zeros((len(pixels), 3, h, w), np.float32)
  for k, p in enumerate(pixels):
    batch[k, :, :p.shape[1], :p.shape[2]] = p
  return torch.tensor(batch), torch.tensor([p.shape[1:] for p in pixels])
