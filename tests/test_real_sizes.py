"""Real sizes on paper: the 24B parent and the 3B child compile a training step without weights, and so does
the real-size SFT job (3B student, frozen 14B teacher, 16K tokens, fp8)."""

import os

import pytest

from ministral_jax import configs, sharding
from ministral_jax.model import abstract, config
from ministral_jax.train import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["mistral_small_3_1_24b", "ministral3_3b"])
def test_real_size_train_step_compiles_on_8_device_fsdp_tensor_mesh(name, record_property):
  part = sharding.Partitioner.from_config(dict(data=1, fsdp=4, tensor=2))
  cfg = config.preset(name, param_dtype="float32", dtype="bfloat16", remat_policy="full")
  report = abstract.compile_train_step(cfg, part, batch=4, seq=512)
  gib = 2**30
  print(f"\n{name}: params {report.param_bytes_total / gib:.2f} GiB total, "
        f"{report.param_bytes_per_device / gib:.2f} GiB per device; compiled per device: "
        f"arguments {report.argument_bytes / gib:.2f} GiB, temporaries {report.temp_bytes / gib:.2f} GiB")
  record_property("param_bytes_per_device", report.param_bytes_per_device)
  assert report.param_bytes_total == 4 * config.param_count(cfg)
  # Every parameter is split 8 ways (embed over fsdp=4, heads/mlp/vocab over tensor=2), norms aside.
  assert report.param_bytes_per_device == pytest.approx(report.param_bytes_total / 8, rel=1e-3)
  # Arguments = params + AdamW's two moments, all sharded like the params (+ the token batch).
  assert report.argument_bytes == pytest.approx(3 * report.param_bytes_per_device, rel=1e-3)


def test_real_size_sft_with_a_14b_teacher_at_16k_compiles_on_8_devices(record_property):
  """configs/sft_ministral3.py's own train step: the 3B student in fp8 with fp32 master weights, the 14B
  teacher frozen in bfloat16, one 16,384-token row per batch shard (the config's microbatch)."""
  cfg = configs.load(os.path.join(REPO, "configs", "sft_ministral3.py") + ":reasoning")
  part = sharding.Partitioner.from_config(cfg.mesh)
  assert dict(part.mesh.shape) == {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}
  cfg.train.global_batch, cfg.train.grad_accum = 2, 1
  student = config.ModelConfig.from_dict(cfg.model)
  teacher = config.preset("ministral3_14b", param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")
  mem = sft.compile_abstract(cfg, teacher, part).memory_analysis()
  _, student_bytes = abstract.param_bytes(student, part)
  _, teacher_bytes = abstract.param_bytes(teacher.replace(dtype=cfg.sft.teacher_dtype), part)
  gib = 2**30
  print(f"\nsft 3B <- 14B at 16K, per device: student {student_bytes / gib:.2f} GiB, teacher {teacher_bytes / gib:.2f} "
        f"GiB; compiled: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, temporaries "
        f"{mem.temp_size_in_bytes / gib:.2f} GiB")
  record_property("sft_temp_bytes", mem.temp_size_in_bytes)
  # Arguments = the student with AdamW's two moments (fp32, sharded like it) + the bf16 teacher + the batch.
  assert mem.argument_size_in_bytes == pytest.approx(3 * student_bytes + teacher_bytes, rel=1e-3)
  assert teacher_bytes == pytest.approx(2 * config.param_count(teacher) / 8, rel=1e-2)


def test_real_size_grpo_rollout_and_train_step_compile_on_8_devices(record_property):
  """configs/grpo_ministral3.py's own programs: the 3B policy's rollout (prompts bucketed to 1,024 tokens,
  16 samples each, up to 16,384 new tokens: the KV cache of every row) and its GRPO step (4 minibatches
  over 17,408-token rows), at 2 prompts per step (one per batch shard)."""
  cfg = configs.load(os.path.join(REPO, "configs", "grpo_ministral3.py"))
  part = sharding.Partitioner.from_config(cfg.mesh)
  cfg.train.global_batch, cfg.grpo.minibatches = 2, 1  # 32 rows: 16 microbatches of one row per batch shard
  from ministral_jax.train import grpo
  rollout, step = grpo.compile_abstract(cfg, part, prompt_width=1024)
  policy = config.ModelConfig.from_dict(cfg.model)
  _, param_bytes = abstract.param_bytes(policy, part)
  r, s = rollout.memory_analysis(), step.memory_analysis()
  gib = 2**30
  rows, cache_len = 2 * cfg.grpo.samples, 1024 + cfg.grpo.sampling.max_new_tokens
  kv_bytes = 2 * policy.n_layers * rows * cache_len * policy.n_kv_heads * policy.head_dim * 2  # bf16 K and V
  print(f"\ngrpo 3B, per device: params {param_bytes / gib:.2f} GiB; rollout ({rows} rows x {cache_len} cache): "
        f"arguments {r.argument_size_in_bytes / gib:.2f} GiB, temporaries {r.temp_size_in_bytes / gib:.2f} GiB "
        f"(KV cache {kv_bytes / 8 / gib:.2f} GiB); train step: arguments {s.argument_size_in_bytes / gib:.2f} GiB, "
        f"temporaries {s.temp_size_in_bytes / gib:.2f} GiB")
  record_property("grpo_rollout_temp_bytes", r.temp_size_in_bytes)
  record_property("grpo_step_temp_bytes", s.temp_size_in_bytes)
  assert r.argument_size_in_bytes == pytest.approx(param_bytes, rel=1e-2)  # the params (+ a few prompt ids)
  # The cache is split over the batch shards (fsdp=2) and kv heads (tensor=4): at least its share is live.
  assert r.temp_size_in_bytes >= kv_bytes / 8
  assert s.argument_size_in_bytes == pytest.approx(3 * param_bytes, rel=1e-2)  # + AdamW's two moments


def test_real_size_pwrm_and_online_dpo_programs_compile_on_8_devices(record_property):
  """configs/posttrain_ministral3.py's own preference programs at 3B: the PWRM's train step (both readings of
  8,192-token judgments), and Online DPO's rollout (two samples per prompt), judgment and DPO step (policy
  with AdamW, frozen reference), at 2 prompts or pairs per step (one per batch shard)."""
  from ministral_jax.train import odpo, pwrm
  cfg = configs.load(os.path.join(REPO, "configs", "posttrain_ministral3.py"))
  j = cfg.jobs
  part = sharding.Partitioner.from_config(j.odpo.mesh)
  for job in (j.odpo, j.pwrm):
    job.train.global_batch, job.train.grad_accum = 2, 1
  policy, judge_cfg = (config.ModelConfig.from_dict(job.model) for job in (j.odpo, j.pwrm))
  rollout, judge, step = odpo.compile_abstract(j.odpo, part, 1024, judge_cfg)
  pwrm_step = pwrm.compile_abstract(j.pwrm, part)
  _, param_bytes = abstract.param_bytes(policy, part)
  gib = 2**30
  memories = {name: p.memory_analysis() for name, p in
              (("rollout", rollout), ("judgment", judge), ("odpo_step", step), ("pwrm_step", pwrm_step))}
  print("\nposttrain 3B, per device: params {:.2f} GiB; ".format(param_bytes / gib) + "; ".join(
      f"{n}: arguments {m.argument_size_in_bytes / gib:.2f} GiB, temporaries {m.temp_size_in_bytes / gib:.2f} GiB"
      for n, m in memories.items()))
  for n, m in memories.items():
    record_property(f"{n}_temp_bytes", m.temp_size_in_bytes)
  assert memories["rollout"].argument_size_in_bytes == pytest.approx(param_bytes, rel=1e-2)
  assert memories["judgment"].argument_size_in_bytes == pytest.approx(param_bytes, rel=1e-2)
  # The policy with AdamW's two moments, and the frozen reference sharded like it.
  assert memories["odpo_step"].argument_size_in_bytes == pytest.approx(4 * param_bytes, rel=1e-2)
  assert memories["pwrm_step"].argument_size_in_bytes == pytest.approx(3 * param_bytes, rel=1e-2)


def test_real_size_cascade_long_context_stage_compiles_at_262k_tokens_with_context_parallelism(tmp_path,
                                                                                             record_property):
  """configs/cascade_ministral3.py's long-context stage of the 3B: one 262,144-token row, split over a context
  axis of 8 simulated devices (the config's 16 x 4 needs 64), distilled from the 24B parent that reads the
  same long context. Attention is the blockwise kernel under context parallelism; a dense `[seq, seq]`
  score matrix alone would be 256 GiB per head."""
  from ministral_jax.cascade import task as cascade
  from ministral_jax.train import distill
  cfg = configs.load(os.path.join(REPO, "configs", "cascade_ministral3.py"))
  assert cfg.long.mesh.context > 1
  cfg.long.mesh = sharding.mesh_config(data=1, fsdp=1, context=8, tensor=1)
  parent = config.ModelConfig.from_dict(cfg.parent.model)  # (parent_config also checks the gs:// checkpoint)
  stage = [s for s in cascade.stages(cfg, parent) if s.name == "ministral3_3b"][0]
  name = f"{stage.name}/long"
  job = cascade.Cascade(cfg, tmp_path, n_jobs=1, flops={name: 0.0}).job_config(
      name, "distill", stage.long, 1, (0, ()), seq_len=cfg.long.seq_len, global_batch=1,
      optimizer=cfg.distill_optimizer, teacher="parent", teacher_context="student", mesh=cascade.long_mesh(cfg))
  part = sharding.Partitioner.from_config(job.mesh)
  assert part.context_size() == 8 and job.data.seq_len == 262_144
  mem = distill.compile_abstract(job, parent, part).memory_analysis()
  _, student_bytes = abstract.param_bytes(stage.long, part)
  _, teacher_bytes = abstract.param_bytes(parent, part)
  gib = 2**30
  print(f"\ncascade 3B long stage at 262K tokens (24B teacher), per device: arguments "
        f"{mem.argument_size_in_bytes / gib:.2f} GiB, temporaries {mem.temp_size_in_bytes / gib:.2f} GiB")
  record_property("cascade_long_temp_bytes", mem.temp_size_in_bytes)
  assert mem.argument_size_in_bytes == pytest.approx(3 * student_bytes + teacher_bytes, rel=1e-2)
  assert mem.argument_size_in_bytes + mem.temp_size_in_bytes < 95 * gib  # one v5p chip


def test_real_size_lm_eval_scoring_compiles_on_8_devices(record_property):
  """configs/lm_eval_ministral3.py's scoring program: the 3B in bf16 split over 8 devices (fsdp), 32 rows of
  4,096 tokens (a 5-shot MMLU prompt is ~1-2K), 256 scored positions. The LM head runs tile by tile: the
  `[256, 131072]` fp32 logits (128 MiB) never exist."""
  from ministral_jax.eval import harness_model
  cfg = configs.load(os.path.join(REPO, "configs", "lm_eval_ministral3.py") + ":/ckpt/3b")
  part = sharding.Partitioner.from_config(cfg.mesh)
  assert dict(part.mesh.shape) == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
  model = config.preset("ministral3_3b", param_dtype="bfloat16", dtype="bfloat16")
  mem = harness_model.compile_abstract(model, part, cfg.eval.batch_size, 4096, 256).memory_analysis()
  _, param_bytes = abstract.param_bytes(model, part)
  gib = 2**30
  print(f"\nlm_eval 3B, per device: params {param_bytes / gib:.2f} GiB; compiled: arguments "
        f"{mem.argument_size_in_bytes / gib:.2f} GiB, temporaries {mem.temp_size_in_bytes / gib:.2f} GiB")
  record_property("lm_eval_temp_bytes", mem.temp_size_in_bytes)
  assert mem.argument_size_in_bytes == pytest.approx(param_bytes, rel=1e-2)  # the params (+ token ids)
  assert mem.temp_size_in_bytes < 8 * gib
