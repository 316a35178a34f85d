"""The pruning pass end to end: exactness at the identity target, real shapes on paper, any mesh, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ministral_jax import configs, sharding
from ministral_jax.checkpoint import hf, orbax_io
from ministral_jax.data import pipeline
from ministral_jax.model import config, transformer
from ministral_jax.prune import ablation, pruner, rewrite
from ministral_jax.prune import task as prune_task

TOKENS = np.random.RandomState(0).randint(0, 512, (2, 40)).astype(np.int32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = sharding.Partitioner(sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]))


def _logits(params, cfg):
  return np.asarray(transformer.Transformer(cfg).apply({"params": params}, TOKENS)[0])


def _random_batches(n=2, batch=4, seq=32, vocab=512):
  rng = np.random.RandomState(5)
  out = [{"inputs": rng.randint(3, vocab, (batch, seq)).astype(np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          "segment_ids": np.ones((batch, seq), np.int32)} for _ in range(n)]
  return lambda: iter(out)


def _parent(cfg, seed=0, final_gain=None):
  params = transformer.init_params(cfg, jax.random.key(seed))
  rng = np.random.RandomState(seed)
  for site in ("attention_norm", "ffn_norm"):
    params["layers"][site]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (cfg.n_layers, cfg.d_model)), jnp.float32)
  params["norm"]["scale"] = (jnp.full((cfg.d_model,), final_gain, jnp.float32) if final_gain is not None else
                             jnp.asarray(rng.uniform(0.5, 1.5, cfg.d_model), jnp.float32))
  params["tok_embeddings"] = params["tok_embeddings"] * 30
  return params


@pytest.mark.parametrize("recalibrate", [False, True])
@pytest.mark.parametrize("preset,final_gain", [("tiny", None), ("tiny_tied", 1.3)])
def test_pruning_to_the_parents_own_shape_reproduces_its_logits(preset, final_gain, recalibrate):
  """Every step runs (scores, a full-width PCA rotation with the gains folded, all FFN channels)."""
  cfg = config.preset(preset)
  params = _parent(cfg, final_gain=final_gain)
  pcfg = pruner.prune_config()
  pcfg.recalibrate = recalibrate
  result = pruner.prune(params, cfg, cfg, pcfg, _random_batches(), ONE_DEVICE)
  assert result.report["hidden"]["energy_kept"] == pytest.approx(1.0)
  assert not np.allclose(result.params["tok_embeddings"], params["tok_embeddings"], atol=1e-3)  # it rotated
  np.testing.assert_allclose(_logits(result.params, cfg), _logits(params, cfg), atol=1e-4)


def test_tied_child_of_an_untied_parent_is_tied_with_the_documented_gain():
  parent = config.preset("tiny")
  target = parent.replace(d_model=48, d_ffn=96, tie_embeddings=True)
  result = pruner.prune(_parent(parent), parent, target, pruner.prune_config(), _random_batches(), ONE_DEVICE)
  assert "output" not in result.params and result.params["tok_embeddings"].shape == (512, 48)
  assert np.all(np.isfinite(_logits(result.params, target)))


# ---------------------------------------------------------------- real sizes, no weights

CASCADE = [("mistral_small_3_1_24b", "ministral3_14b"), ("ministral3_14b", "ministral3_8b"),
           ("ministral3_8b", "ministral3_3b")]


def _abstract_plan(parent, target):
  i32, f32 = jnp.int32, jnp.float32
  return rewrite.Plan(
      layers=jax.ShapeDtypeStruct((target.n_layers,), i32) if target.n_layers < parent.n_layers else None,
      rotation=jax.ShapeDtypeStruct((parent.d_model, target.d_model), f32) if target.d_model < parent.d_model else None,
      ffn=jax.ShapeDtypeStruct((target.n_layers, target.d_ffn), i32))


@pytest.mark.parametrize("parent_name,target_name", CASCADE)
def test_the_papers_cascade_shapes_come_out_of_the_parent_abstractly(parent_name, target_name):
  parent, target = config.preset(parent_name), config.preset(target_name)
  pcfg = pruner.shrinking_steps(pruner.prune_config(), parent, target)
  pruner.check(parent, target, pcfg)  # heads, vocabulary and sizes are a valid target
  out = jax.eval_shape(lambda p, plan: rewrite.apply_plan(p, plan, tie=target.tie_embeddings),
                       transformer.abstract_params(parent), _abstract_plan(parent, target))
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, transformer.abstract_params(target))
  assert config.param_count(target) < config.param_count(parent)


def test_the_8b_to_3b_rewrite_compiles_sharded_on_an_8_device_mesh():
  parent, target = config.preset("ministral3_8b"), config.preset("ministral3_3b")
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  shard = lambda tree, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, s)
  params = shard(transformer.abstract_params(parent), part.param_shardings(parent))
  plan = _abstract_plan(parent, target)
  fn = pruner._rewriter(part, target, True, "head", None)
  compiled = fn.lower(params, plan).compile()
  out_shardings = jax.tree.leaves(compiled.output_shardings)
  assert out_shardings == jax.tree.leaves(part.param_shardings(target))
  per_device = compiled.memory_analysis().output_size_in_bytes
  assert per_device == pytest.approx(4 * config.param_count(target) / 8, rel=1e-3)


# ---------------------------------------------------------------- the task, on disk

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny parent checkpoint and a SentencePiece model trained once for the whole module."""
  root = tmp_path_factory.mktemp("prune")
  data = pipeline.data_config()
  data.update(spm_vocab_size=512, max_documents=200, seq_len=32)
  tokenizer = pipeline.build_tokenizer(data, str(root))
  cfg = config.preset("tiny")
  orbax_io.save_params(root / "parent", _parent(cfg), cfg)
  return root, str(tokenizer.path)


def _config(setup, **target):
  root, tokenizer = setup
  c = ml_collections.ConfigDict()
  c.prune = pruner.prune_config(parent=str(root / "parent"))
  c.prune.update(calibration_batches=2, calibration_batch_size=4)
  c.model = config.preset_dict("tiny", **{**dict(n_layers=1, d_model=48, d_ffn=96), **target})
  c.data = pipeline.data_config()
  c.data.update(tokenizer=tokenizer, max_documents=200, seq_len=32)
  c.mesh = sharding.mesh_config(data=-1)
  c.loss = ml_collections.ConfigDict(dict(seq_chunk=512, vocab_chunk=8192))
  c.eval = ml_collections.ConfigDict(dict(checkpoint="", files="", batch_size=4, max_batches=2))
  return c


def test_the_task_gives_the_same_child_on_8_devices_as_on_one(setup, tmp_path):
  cfg = _config(setup)
  one = prune_task.run(cfg, str(tmp_path / "one"), ONE_DEVICE)
  eight = prune_task.run(cfg, str(tmp_path / "eight"), sharding.Partitioner.from_config(dict(data=2, fsdp=2, tensor=2)))
  for step in ("layers", "ffn"):
    assert one[step]["kept" if step == "layers" else "channels_kept"] == \
        eight[step]["kept" if step == "layers" else "channels_kept"]
  a, child_cfg = orbax_io.load_params(tmp_path / "one" / "params")
  b, _ = orbax_io.load_params(tmp_path / "eight" / "params")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  assert (child_cfg.n_layers, child_cfg.d_model, child_cfg.d_ffn) == (1, 48, 96)


def test_the_task_writes_the_report_beside_the_child_and_resumes(setup, tmp_path):
  cfg = _config(setup)
  report = prune_task.run(cfg, str(tmp_path), ONE_DEVICE)
  saved = json.loads((tmp_path / "params" / prune_task.REPORT_FILE).read_text())
  assert saved["layers"]["removed"] == report["layers"]["removed"] and len(saved["layers"]["scores"]) == 2
  assert len(saved["ffn"]["channels_kept"]) == 2 and len(saved["ffn"]["channels_kept"][0]) == 96
  assert 0 < saved["hidden"]["energy_kept"] <= 1
  scores = np.load(tmp_path / "params" / prune_task.SCORES_FILE)
  assert scores["hidden/explained_variance_curve"].shape == (64,)
  assert scores["ffn/scores"].shape == (2, 128)
  stamp = (tmp_path / "params" / "model_config.json").stat().st_mtime_ns
  assert prune_task.run(cfg, str(tmp_path), ONE_DEVICE)["layers"] == report["layers"]  # found, not redone
  assert (tmp_path / "params" / "model_config.json").stat().st_mtime_ns == stamp
  other = _config(setup, d_ffn=64)
  with pytest.raises(ValueError, match="child of a different prune job"):
    prune_task.run(other, str(tmp_path), ONE_DEVICE)


BAD_TARGETS = [
    (dict(d_ffn=256), "larger than the parent"),
    (dict(n_kv_heads=1), "heads are never pruned"),
    (dict(vocab_size=256), "pruning keeps the vocabulary"),
]


@pytest.mark.parametrize("target,message", BAD_TARGETS)
def test_a_target_the_parent_cannot_be_pruned_to_is_one_clear_error_and_writes_nothing(setup, tmp_path, target,
                                                                                     message):
  with pytest.raises(ValueError, match=message):
    prune_task.run(_config(setup, **target), str(tmp_path), ONE_DEVICE)
  assert not (tmp_path / "params").exists()


@pytest.mark.parametrize("change,message", [
    (dict(order="layers,hidden"), "step 'ffn' is not in prune.order"),
    (dict(layer_scorer="magnitude"), "prune.layer_scorer='magnitude' is not one of"),
    (dict(order="layers,ffn,ffn,hidden"), "names a step twice"),
    (dict(parent="/nonexistent/parent"), "does not exist"),
])
def test_a_bad_prune_config_is_one_clear_error(setup, tmp_path, change, message):
  cfg = _config(setup)
  cfg.prune.update(change)
  with pytest.raises(ValueError, match=message):
    prune_task.run(cfg, str(tmp_path), ONE_DEVICE)
  assert not (tmp_path / "params").exists()


def test_empty_calibration_data_is_one_clear_error(setup, tmp_path):
  cfg = _config(setup)
  (tmp_path / "empty.txt").write_text("\n\n")
  cfg.data.update(source="text", paths=str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match="is empty"):
    prune_task.run(cfg, str(tmp_path / "w"), ONE_DEVICE)
  assert not (tmp_path / "w" / "params").exists()


def test_a_checkpoint_that_disagrees_with_its_config_is_one_clear_error(setup, tmp_path):
  root, _ = setup
  bad = tmp_path / "bad_parent"
  cfg = config.preset("tiny")
  orbax_io.save_params(bad, _parent(cfg), cfg)
  (bad / "model_config.json").write_text(json.dumps(cfg.replace(d_ffn=256).to_dict()))
  before = sorted(p.name for p in bad.iterdir())
  run_cfg = _config(setup)
  run_cfg.prune.parent = str(bad)
  with pytest.raises(ValueError, match="does not match its model config"):
    prune_task.run(run_cfg, str(tmp_path / "w"), ONE_DEVICE)
  assert not (tmp_path / "w" / "params").exists()
  assert sorted(p.name for p in bad.iterdir()) == before  # the input is never modified


def test_the_ablation_prunes_with_every_scorer_and_resumes(setup, tmp_path):
  cfg = _config(setup, tie_embeddings=True)
  state = ablation.run(cfg, str(tmp_path), ONE_DEVICE)
  labels = set(state["rows"])
  expected = {"layers: block_influence", "layers: random", "layers: drop_last", "hidden: pca_normalized",
              "hidden: activation",
              "hidden: gain", "ffn: magnitude", "ffn: random", "recalibrate=True", "tie_init: embedding",
              "tie_init: mean"}
  assert expected <= labels and len(labels) == len(expected) + 1
  assert all(np.isfinite(r["loss"]["eval_split"]) for r in state["rows"].values())
  md = (tmp_path / "ablation.md").read_text()
  assert md.count("\n| ") == len(labels) + 2  # parent row, rows (after the header line)
  stamp = (tmp_path / "ablation.json").stat().st_mtime_ns
  again = ablation.run(cfg, str(tmp_path), ONE_DEVICE)
  assert again["rows"] == json.loads(json.dumps(state["rows"]))
  assert (tmp_path / "ablation.json").stat().st_mtime_ns == stamp


def test_the_prune_config_runs_from_the_command_line(setup, tmp_path):
  root, tokenizer = setup
  tiny = config.preset("tiny")
  args = [f"--config.prune.parent={root / 'parent'}", f"--config.data.tokenizer={tokenizer}",
          "--config.data.max_documents=200", "--config.data.seq_len=32", "--config.prune.calibration_batches=1",
          "--config.prune.calibration_batch_size=2", "--config.model.n_layers=1", "--config.model.d_model=48",
          "--config.model.d_ffn=96", "--config.prune.layer_scorer=block_influence",
          *(f"--config.model.{k}={getattr(tiny, k)}" for k in ("vocab_size", "n_heads", "n_kv_heads", "head_dim"))]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "ministral_jax.main", "--config=configs/prune_tiny.py",
                         f"--workdir={tmp_path}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| layers | block_influence | 2 -> 1 |" in proc.stdout
  assert orbax_io.load_config(tmp_path / "params").d_model == 48


@pytest.mark.parametrize("step,order", [("24b_to_14b", "ffn"), ("14b_to_8b", "layers,hidden,ffn"),
                                        ("8b_to_3b", "layers,hidden,ffn")])
def test_the_real_size_prune_config_targets_the_published_child(step, order):
  module = configs.load_module(os.path.join(REPO, "configs", "prune_ministral3.py"))
  cfg = module.get_config(step)
  parent_name, target_name = module.STEPS[step]
  target = config.ModelConfig.from_dict(cfg.model)
  assert cfg.prune.order == order
  assert target.arch_dict() == config.preset(target_name).arch_dict()
  pruner.check(config.preset(parent_name), target, cfg.prune)


def test_a_hugging_face_parent_directory_is_pruned_directly_to_the_same_child(setup, tmp_path):
  root, _ = setup
  params, cfg = orbax_io.load_params(root / "parent")
  hf.save_hf(jax.tree.map(np.asarray, params), cfg, tmp_path / "hf_parent")
  from_orbax, from_hf = _config(setup), _config(setup)
  from_hf.prune.parent = str(tmp_path / "hf_parent")
  prune_task.run(from_orbax, str(tmp_path / "a"), ONE_DEVICE)
  prune_task.run(from_hf, str(tmp_path / "b"), ONE_DEVICE)
  a, _ = orbax_io.load_params(tmp_path / "a" / "params")
  b, _ = orbax_io.load_params(tmp_path / "b" / "params")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
