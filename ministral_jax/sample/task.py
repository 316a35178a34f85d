"""Task `sample`: continue prompts with a checkpoint, or with a random model kept in the workdir.

`config.init_from` names the checkpoint to sample: an orbax, Hugging Face or
Mistral-native directory, read where it is (nothing is copied into the
workdir). Its architecture is its own, so `config.model` only contributes the
execution fields (dtype, param_dtype, attention_impl, ...).

Without `init_from` (the built-in default, `configs/tiny_sample.py`, which needs
no download) the model is a random init of `config.model` with `config.seed`,
saved in `<workdir>/params` so that a re-run samples the same model. A re-run
whose model or seed differ is refused rather than answered with the old model.

Everything the config can get wrong is checked before any work, so a bad
value writes nothing: the sampling fields, the prompts, the tokenizer against
the model and against the one the checkpoint recorded, each prompt's length.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import jax
import ml_collections
from etils import epath

from ministral_jax import files, sharding
from ministral_jax.checkpoint import convert, orbax_io
from ministral_jax.data import images as image_io
from ministral_jax.data import tokenizers
from ministral_jax.errors import UserError
from ministral_jax.model.config import ARCH_FIELDS, ModelConfig, param_count
from ministral_jax.sample import sampler

PARAMS_DIR = "params"
SAMPLES_FILE = "samples.json"


@dataclasses.dataclass(frozen=True)
class Model:
  """What will be sampled: its config, where its params are, and whether they exist yet."""
  cfg: ModelConfig
  path: str
  exists: bool  # False: a random init, made and saved at `path` once the checks pass


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Samples every prompt and writes `<workdir>/samples.json`; every check runs before the first write."""
  check_sampling(cfg)
  prompts = read_prompts(cfg)
  tokenizer = tokenizers.load_tokenizer(cfg.tokenizer)
  model = plan_model(cfg, epath.Path(workdir), tokenizer)
  tokenizers.check_vocab_fits(tokenizer, model.cfg.vocab_size)
  images = read_images(cfg.get("images", ""), len(prompts), model.cfg, tokenizer)
  prompt_ids = encode_prompts(prompts, tokenizer, model.cfg, cfg.max_new_tokens, images)
  partitioner = sharding.Partitioner.from_config(cfg.mesh)
  partitioner.param_shardings(model.cfg)  # the mesh must divide the model
  # Checks done; from here on the job writes.
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  params, model_cfg = load_params(model, partitioner, cfg.seed, tokenizer)
  start = time.time()
  with partitioner.activate():
    outputs = sampler.generate(params, model_cfg, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                               jax.random.key(cfg.seed), eos_id=tokenizer.eos_id,
                               images=[[p.pixels] for p in images] if images else None)
  seconds = time.time() - start
  samples = [{"prompt": p, "completion": tokenizer.decode(o), "tokens": o} for p, o in zip(prompts, outputs)]
  for s in samples:
    print(f"{s['prompt']!r} -> {s['completion']!r}")
  result = {"checkpoint": model.path, "params": param_count(model_cfg), "mesh": dict(partitioner.mesh.shape),
            "seed": cfg.seed, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "seconds": seconds, "samples": samples}
  files.write_json(workdir / SAMPLES_FILE, result)
  print(f"{result['params']:,} parameters on mesh {result['mesh']}; "
        f"{len(prompts)} x {cfg.max_new_tokens} tokens in {seconds:.1f}s; wrote {workdir / SAMPLES_FILE}")
  return result


# --------------------------------------------------------------------------
# The config's own values.
# --------------------------------------------------------------------------
def check_sampling(cfg: ml_collections.ConfigDict) -> None:
  if cfg.max_new_tokens < 1:
    raise UserError(f"config.max_new_tokens is {cfg.max_new_tokens}; it must be at least 1 "
                    "(e.g. --config.max_new_tokens=16).")
  if cfg.temperature < 0:
    raise UserError(f"config.temperature is {cfg.temperature}; it must be 0 (greedy) or more "
                    "(e.g. --config.temperature=0.7).")


def read_prompts(cfg: ml_collections.ConfigDict) -> list[str]:
  """`config.prompts` (one prompt per line) or `config.prompt_file` (the same, in a file); not both,
  so that neither is ever silently ignored."""
  inline, path = cfg.prompts, cfg.get("prompt_file", "")
  if inline and path:
    raise UserError(f"config.prompts and config.prompt_file={path!r} are both set; keep one (to sample "
                    "only the file's prompts, add --config.prompts='').")
  if path:
    prompts, where = _lines(_read_text(path)), f"prompt_file {path}"
  else:
    prompts, where = (_lines(inline) if isinstance(inline, str) else list(inline)), "config.prompts"
  if not prompts:
    raise UserError(f"No prompts: {where} is empty. Set --config.prompts='Once upon a time' (several: one "
                    "per line) or --config.prompt_file=<a text file, one prompt per line>.")
  for i, p in enumerate(prompts):
    if not isinstance(p, str) or not p.strip():
      raise UserError(f"Prompt {i + 1} of {where} is empty ({p!r}); every prompt needs text. Remove "
                      "the empty line.")
  return prompts


def _lines(text: str) -> list[str]:
  """One prompt per line; a final newline ends the last line, it does not add an empty prompt."""
  if not text:
    return []
  return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]


def _read_text(path: str) -> str:
  try:
    return epath.Path(path).read_text()
  except FileNotFoundError:
    raise UserError(f"config.prompt_file {path} does not exist; point it at a text file with one prompt "
                    "per line.") from None
  except (IsADirectoryError, UnicodeDecodeError) as e:
    raise UserError(f"config.prompt_file {path} is not a UTF-8 text file ({type(e).__name__}); point it "
                    "at a text file with one prompt per line.") from None


def read_images(spec: str, n_prompts: int, model_cfg: ModelConfig, tokenizer: tokenizers.Tokenizer
                ) -> list[image_io.ProcessedImage]:
  """`config.images`: comma-separated image files, one per prompt (or one for every prompt), preprocessed for
  the model's ViT (mistral-common's encoder); [] without images. Checked before any work."""
  paths = [p.strip() for p in spec.split(",")] if spec else []
  if not paths:
    return []
  if not model_cfg.vision_layers:
    raise UserError(f"config.images names {len(paths)} image(s) but the model is text-only "
                    "(vision_layers=0); sample a multimodal checkpoint or preset (e.g. tiny_vision).")
  if len(paths) not in (1, n_prompts):
    raise UserError(f"config.images names {len(paths)} images for {n_prompts} prompts; give one per prompt, "
                    "or one for every prompt.")
  image_io.check_model_ids(tokenizer, model_cfg.image_token_id, model_cfg.image_break_id, model_cfg.image_end_id)
  processed = [image_io.preprocess_mistral(image_io.load_image(p, name=f"config.images {p}"),
                                           model_cfg.vision_image_size, model_cfg.vision_patch_size,
                                           model_cfg.spatial_merge_size) for p in paths]
  return processed * n_prompts if len(processed) == 1 else processed


def encode_prompts(prompts: Sequence[str], tokenizer: tokenizers.Tokenizer, model_cfg: ModelConfig,
                   max_new_tokens: int, images: Sequence[image_io.ProcessedImage] = ()) -> list[list[int]]:
  """Token ids (with BOS; a prompt's image's [IMG] layout right after it), each prompt checked to leave room
  for its continuation in the model's context."""
  ids = [tokenizer.encode(p, bos=True) for p in prompts]
  if images:
    ids = [t[:1] + image_io.image_tokens(*image.grid, model_cfg.image_token_id, model_cfg.image_break_id,
                                         model_cfg.image_end_id) + t[1:] for t, image in zip(ids, images)]
  for i, (p, t) in enumerate(zip(prompts, ids)):
    if len(t) + max_new_tokens > model_cfg.max_seq_len:
      room = model_cfg.max_seq_len - len(t)
      fix = f"lower max_new_tokens to {room}, or shorten it" if room >= 1 else "shorten it"
      raise UserError(f"Prompt {i + 1} ({_preview(p)}) is {len(t)} tokens; with max_new_tokens="
                      f"{max_new_tokens} that is {len(t) + max_new_tokens}, more than the model's max_seq_len "
                      f"{model_cfg.max_seq_len}: {fix}.")
  return ids


def _preview(text: str, n: int = 40) -> str:
  return repr(text) if len(text) <= n else repr(text[:n]) + "..."


# --------------------------------------------------------------------------
# The model: a checkpoint, or the random one of this workdir.
# --------------------------------------------------------------------------
def plan_model(cfg: ml_collections.ConfigDict, workdir: epath.Path, tokenizer: tokenizers.Tokenizer) -> Model:
  """Which model the config asks for, checked against what exists; reads configs and metadata only."""
  config_model = ModelConfig.from_dict(cfg.model)
  execution = {k: v for k, v in config_model.to_dict().items() if k not in ARCH_FIELDS}
  tokenizer_what = f"config.tokenizer={cfg.tokenizer!r}"
  if cfg.init_from:
    saved = convert.load_config_any(cfg.init_from)
    ignored = [k for k in ARCH_FIELDS if getattr(saved, k) != getattr(config_model, k)]
    if ignored:
      logging.info("Sampling %s with its own architecture; config.model's %s are not used.", cfg.init_from,
                   ", ".join(ignored))
    tokenizers.check_same(convert.recorded_tokenizer(cfg.init_from), tokenizer.identity(),
                          f"checkpoint {cfg.init_from}", tokenizer_what)
    return Model(saved.replace(**execution), str(cfg.init_from), exists=True)
  ckpt = workdir / PARAMS_DIR
  if not ckpt.exists():
    return Model(config_model, str(ckpt), exists=False)
  check_same_random_model(ckpt, config_model, cfg.seed)
  tokenizers.check_same(convert.recorded_tokenizer(str(ckpt)), tokenizer.identity(), f"the random model {ckpt}",
                        tokenizer_what)
  return Model(config_model, str(ckpt), exists=True)


def check_same_random_model(ckpt: epath.Path, model_cfg: ModelConfig, seed: int) -> None:
  """A workdir's random model is the config's only if the architecture and the seed both agree."""
  saved = orbax_io.load_config(ckpt)
  meta = orbax_io.read_metadata(ckpt)
  diff = [f"model.{k}: {getattr(saved, k)!r} there, {getattr(model_cfg, k)!r} in the config"
          for k in ARCH_FIELDS if getattr(saved, k) != getattr(model_cfg, k)]
  if meta.get("task") != "sample":
    diff.append(f"task: {meta.get('task')!r} there (not a random model of task sample), 'sample' here")
  if meta.get("seed") != seed:
    diff.append(f"seed: {meta.get('seed')!r} there, {seed!r} in the config")
  if diff:
    raise UserError(f"Workdir {ckpt.parent} holds a different model ({ckpt}) from the one this config asks for:"
                    "\n  " + "\n  ".join(diff) + "\nUse a new --workdir (nothing was changed in this one), or the "
                    "config that made it.")


def load_params(model: Model, partitioner: sharding.Partitioner, seed: int, tokenizer: tokenizers.Tokenizer
                ) -> tuple[Any, ModelConfig]:
  if model.exists:
    logging.info("Restoring %s", model.path)
    return convert.load_any(model.path, partitioner, model.cfg)
  params, model_cfg = convert.load_or_init("", model.cfg, partitioner, seed)
  orbax_io.save_params(model.path, params, model_cfg,
                       extra_metadata={"task": "sample", "seed": seed, "tokenizer": tokenizer.identity()})
  return params, model_cfg
