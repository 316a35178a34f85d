"""Greedy generation from our KV cache equals transformers' `generate`, token for token."""

import jax
import torch
from transformers import Ministral3Config, Ministral3ForCausalLM

from ministral_jax.checkpoint import hf
from ministral_jax.model import config, transformer
from ministral_jax.sample import sampler


def test_greedy_generation_of_32_tokens_equals_transformers_generate(tmp_path):
  """Batched prompts of different lengths; generation runs past the YaRN original context (32)."""
  hf_cfg = Ministral3Config(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
      rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32,
                           beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                           llama_4_scaling_beta=0.1))
  torch.manual_seed(3)
  model = Ministral3ForCausalLM(hf_cfg).eval()
  model.save_pretrained(tmp_path)
  params, cfg = hf.load_hf(tmp_path)
  prompts = [[1, 5, 9, 33, 2, 7], [1, 7], [1, 100, 200, 300, 400, 401, 402, 403, 404, 405, 406]]
  ours = sampler.generate(params, cfg, prompts, max_new_tokens=32, eos_id=-1)  # no early stop
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_generation_stops_each_row_at_its_own_eos():
  cfg = config.preset("tiny")
  params = transformer.init_params(cfg, jax.random.key(0))
  greedy = sampler.generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=8, eos_id=-1)
  eos = greedy[0][2]  # make the first row's third token the EOS
  stopped = sampler.generate(params, cfg, [[1, 2, 3], [4]], max_new_tokens=8, eos_id=eos)
  assert stopped[0] == greedy[0][:3]
  cut = greedy[1].index(eos) + 1 if eos in greedy[1] else 8
  assert stopped[1] == greedy[1][:cut]
