r"""Image understanding in miniature: a tiny Pixtral-style ViT + projector + decoder, trained by SFT on
synthetic image questions, from nothing.

COMMAND: python -m ministral_jax.main --config=configs/vision_tiny.py --workdir=/tmp/ministral_jax/vision_tiny

The data (`data/shapes.py`, written to <workdir>/data on the first run): 56x56 canvases with one to four
coloured squares, circles and triangles, one per quadrant; each conversation asks the colour of a shape,
the shape of a colour, how many (of a shape), or where (top-left ...), and the assistant answers with one
word. The held-out split shares no (image, question) pair with the train split. A 56x56 image is 4x4
patches of 14 px, i.e. 2x2 [IMG] tokens after the projector's 2x2 merge, one per quadrant.

The ViT here is trained with the projector (`model.train_vision_encoder=True`): there is no pretrained tiny
ViT to freeze. A real run freezes the shared Pixtral encoder, as the paper does (the default). Every eval
reports the loss on the answer tokens and the greedy answers' held-out accuracy, overall and per question
kind (`eval.answers`; `eval_answer_accuracy_*` in metrics.jsonl). Variants: `quick` (tests, Colab).
"""

import ml_collections

from ministral_jax import sharding
from ministral_jax.data import pipeline
from ministral_jax.eval import answers
from ministral_jax.eval import task as eval_task
from ministral_jax.model import config as model_config
from ministral_jax.train import loop, optimizer, pretrain, sft


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "quick"):
    raise ValueError(f"configs/vision_tiny.py:{arg}: use no argument or quick")
  quick = arg == "quick"
  c = ml_collections.ConfigDict()
  c.task = "sft"
  c.seed = 0
  c.init_from = ""
  # The tiny decoder with a 2-layer ViT of patch 14 (so the canvases are real Pixtral geometry). spm_train
  # numbers [IMG], [IMG_BREAK], [IMG_END] 9, 10, 11 (after <unk> <s> </s> and the six chat controls).
  c.model = model_config.preset_dict(
      "tiny", vocab_size=320, n_layers=4, rope_scaling="none", query_temperature_beta=0.0, max_seq_len=256,
      vision_layers=2, vision_d_model=64, vision_heads=4, vision_d_ffn=128, vision_patch_size=14,
      vision_image_size=56, image_token_id=9, image_break_id=10, image_end_id=11, train_vision_encoder=True)
  c.mesh = sharding.mesh_config(data=-1)
  c.loss = pretrain.loss_config()
  c.eval = eval_task.eval_config()
  # Held-out answers (paths filled with the held-out split when the job writes the data).
  c.eval.answers = answers.answers_config(n=64 if quick else 400)

  c.shapes = ml_collections.ConfigDict(dict(train=256 if quick else 4000, heldout=64 if quick else 400, seed=0,
                                            size=56))
  c.data = pipeline.data_config()
  c.data.update(source="chat", tokenizer="spm_train", spm_vocab_size=320, seq_len=64, epochs=0,
                image_slots=64)  # 64 patches: up to 4 images of 56x56 per packed row of 64 tokens

  c.sft = sft.sft_config()
  c.train = loop.train_config(steps=20 if quick else 1500, global_batch=8 if quick else 32)
  c.train.update(log_every=10 if quick else 100, eval_every=10 if quick else 300, eval_batches=2 if quick else 4,
                 checkpoint_every=10 if quick else 300)
  c.optimizer = optimizer.optimizer_config(lr=1e-3)
  c.optimizer.warmup_steps = 5 if quick else 50
  return c
