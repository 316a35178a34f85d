"""Checkpoints on a pod: conversion by 2 processes x 4 CPU devices (`launch.local_pod`) gives what one
process gives, each process reads only its own slices of a safetensors source, and bad input stops every
process with the same error.

Pod runs use the convert CLI, or this file as a module (`_worker`) where a test needs to look inside a
process (bytes read, the arrays it assembled).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from launch import local_pod
from ministral_jax import sharding
from ministral_jax.checkpoint import convert, hf, integrity, native, orbax_io, safetensors_io
from ministral_jax.errors import EXIT_USER_ERROR
from ministral_jax.model import config, transformer

CFG = config.preset("tiny")
PROCESSES, DEVICES = 2, 4
POD_TIMEOUT = 240
SMALL_SHARDS = "0.0001"  # GB: several safetensors files, so the index and per-file agreement are exercised


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------
def run_pod(args, tmp_path, module="ministral_jax.checkpoint.convert"):
  """Runs `python -m module args` as 2 processes; returns (exit status, each process's output)."""
  procs = local_pod.start([str(a) for a in args], PROCESSES, DEVICES, logdir=str(tmp_path / "logs"),
                          module=module)
  status = local_pod.wait(procs, timeout=POD_TIMEOUT, grace=20)
  return status, [p.output() for p in procs]


def results(outputs):
  """The `RESULT {...}` line each worker process printed, in process order."""
  return [json.loads(next(line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")))
          for out in outputs]


def leaves(params):
  """{"layers/attention/wq": host array} of a param tree."""
  return {"/".join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_bitwise_equal(a, b):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)


def digest(path):
  return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(Path(path).rglob("*")) if f.is_file()}


def tensor_bytes(path):
  """Bytes of tensor data in a safetensors checkpoint directory, from its headers."""
  infos = safetensors_io.read_headers(sorted(Path(path).glob("*.safetensors")))
  return sum(int(np.prod(info.shape)) * safetensors_io.dtype_of(infos, n).itemsize for n, info in infos.items())


@pytest.fixture(scope="module")
def params():
  """Random host arrays of the tiny model's shapes (no init to compile)."""
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), transformer.abstract_params(CFG))


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory, params):
  path = tmp_path_factory.mktemp("hf") / "src"
  hf.save_hf(params, CFG, path, max_shard_bytes=100_000)  # several files: slices come from each
  return path


@pytest.fixture(scope="module")
def orbax_src(tmp_path_factory, hf_src):
  path = tmp_path_factory.mktemp("orbax") / "src"
  convert.main(["--from=hf", "--to=orbax", f"--src={hf_src}", f"--dst={path}"])
  return path


@pytest.fixture(scope="module")
def native_src(tmp_path_factory, params):
  path = tmp_path_factory.mktemp("native") / "src"
  native.save_native(params, CFG, path)
  return path


# --------------------------------------------------------------------------
# Slices: every conversion's block reader gives the block of the converted tensor.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_each_block_reader_reads_exactly_the_block_of_the_converted_tensor(fmt):
  """Every split of every dimension (head_dim too, which only the covering block can serve)."""
  maps = (safetensors_io.decoder_maps(CFG, hf.hf_names()) if fmt == "hf" else safetensors_io.decoder_maps(
      CFG, native.native_names(), native.interleaved_to_half, native.half_to_interleaved))
  assert_block_readers_exact(maps)


def assert_block_readers_exact(maps):
  """Each map's block reader gives `to_ours(tensor)[index]` for every 1/2/4-way split of every dimension."""
  rng = np.random.default_rng(0)
  for m in maps:
    theirs = rng.standard_normal(m.shape).astype(np.float32)
    ours = m.to_ours(theirs)
    splits = [[k for k in (1, 2, 4) if n % k == 0] for n in ours.shape]
    for parts in np.stack(np.meshgrid(*splits, indexing="ij"), -1).reshape(-1, ours.ndim):
      for pick in np.ndindex(*parts):
        index = tuple(slice(i * n // k, (i + 1) * n // k) for i, k, n in zip(pick, parts, ours.shape))
        np.testing.assert_array_equal(m.block(lambda at: theirs[at], index), ours[index],
                                      err_msg=f"{m.name} {index}")


def test_one_process_with_shardings_reads_every_byte_once_and_loads_what_the_host_load_does(hf_src):
  total = tensor_bytes(hf_src)
  before = safetensors_io.bytes_read()
  host, _ = hf.load_hf(hf_src)
  assert safetensors_io.bytes_read() - before == total
  fsdp = sharding.Partitioner.from_config(dict(fsdp=8))
  before = safetensors_io.bytes_read()
  sharded, _ = hf.load_hf(hf_src, shardings=fsdp.param_shardings)
  assert safetensors_io.bytes_read() - before == total  # 8 devices, every part read once
  assert sharded["tok_embeddings"].sharding == fsdp.param_shardings(CFG)["tok_embeddings"]
  assert_bitwise_equal(sharded, host)


# --------------------------------------------------------------------------
# 2 processes x 4 devices.
# --------------------------------------------------------------------------
def test_hf_to_orbax_by_2_processes_equals_1_process(hf_src, orbax_src, tmp_path):
  """`orbax_src` is the same conversion by one process."""
  status, out = run_pod(["--from=hf", "--to=orbax", f"--src={hf_src}", f"--dst={tmp_path / 'pod'}"], tmp_path)
  assert status == 0, out
  assert "Wrote orbax checkpoint" in out[0] and "Wrote" not in out[1]  # one report, from process 0
  pod, pod_cfg = orbax_io.load_params(tmp_path / "pod")
  one, one_cfg = orbax_io.load_params(orbax_src)
  assert pod_cfg == one_cfg
  assert_bitwise_equal(pod, one)
  # The fingerprints the 2 processes computed over their global arrays are those of one host's arrays.
  assert orbax_io.read_metadata(tmp_path / "pod")["fingerprints"] == integrity.fingerprints(one)


def test_orbax_to_hf_by_2_processes_writes_the_same_bytes_as_1_process(orbax_src, tmp_path):
  """Restored (and fingerprint-verified) on 2 processes, streamed a layer at a time to process 0."""
  common = ["--from=orbax", "--to=hf", f"--src={orbax_src}", f"--max_shard_gb={SMALL_SHARDS}"]
  status, out = run_pod([*common, f"--dst={tmp_path / 'pod'}"], tmp_path)
  assert status == 0, out
  convert.main([*common, f"--dst={tmp_path / 'one'}"])
  pod, one = digest(tmp_path / "pod"), digest(tmp_path / "one")
  assert hf.INDEX_FILE in one and "config.json" in one and len(one) > 3
  assert pod == one
  assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "one", "pod"]  # no temporaries


def test_native_import_by_2_processes_equals_1_process_and_each_reads_only_its_half(native_src, tmp_path):
  """fsdp=4 x tensor=2: q/k/v/o heads are split between devices too, so each process undoes the native
  q/k interleave on blocks of whole heads. The shards both processes assembled make up one process's
  import bit for bit; each process read half of every matrix (their embed half) and the norms
  (replicated) whole, while one process reads every byte once
  (`test_one_process_with_shardings_reads_every_byte_once...`)."""
  status, out = run_pod(["native", native_src, "fsdp=4,tensor=2", tmp_path / "shards"], tmp_path,
                        module="tests.test_checkpoint_multihost")
  assert status == 0, out
  one = leaves(native.load_native(native_src)[0])
  assert_bitwise_equal(assembled(tmp_path / "shards", one), one)
  per_process = results(out)
  expected = jax.sharding.PartitionSpec(None, ("fsdp", "context"), "tensor", None)  # embed over fsdp x context
  assert {r["wq_spec"] for r in per_process} == {str(expected)}
  total, norms = tensor_bytes(native_src), 4 * CFG.d_model * (2 * CFG.n_layers + 1)
  read = [r["bytes_read"] for r in per_process]
  print(f"checkpoint {total} tensor bytes; read per process: {read}")
  assert read == [(total - norms) // 2 + norms] * PROCESSES


def test_orbax_load_without_a_partitioner_on_2_processes_is_fsdp_over_all_devices_and_verified(orbax_src,
                                                                                               tmp_path):
  """No device of process 0 can hold what process 1 must address: the default is fsdp over all 8, and the
  fingerprints are checked (and recomputed here) on the global arrays of both processes."""
  status, out = run_pod(["orbax", orbax_src, "", ""], tmp_path, module="tests.test_checkpoint_multihost")
  assert status == 0, out
  recorded = orbax_io.read_metadata(orbax_src)["fingerprints"]
  for r in results(out):
    assert r["fingerprints"] == recorded
    assert r["mesh"] == {"data": 1, "fsdp": PROCESSES * DEVICES, "context": 1, "tensor": 1}


def test_convert_with_a_missing_source_fails_on_every_process_with_one_clear_error(tmp_path):
  status, out = run_pod(["--from=hf", "--to=orbax", f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'x'}"],
                        tmp_path)
  assert status == EXIT_USER_ERROR
  for text in out:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'nowhere' / 'config.json'} not found: an HF checkpoint needs its "
                      "config.json."], text
    assert "Traceback" not in text
  assert not (tmp_path / "x").exists()


def test_a_nan_in_the_slice_only_process_1_reads_stops_both_processes(hf_src, tmp_path):
  """Process 0 reads its columns cleanly; the processes agree on process 1's error instead of process 0
  going on alone into the save (and waiting there forever)."""
  src = Path(shutil.copytree(hf_src, tmp_path / "src"))
  file = next(f for f in src.glob("*.safetensors") if "model.embed_tokens.weight" in safetensors_io.read_header(f))
  tensors = safetensors.numpy.load_file(str(file))
  tensors["model.embed_tokens.weight"][5, CFG.d_model - 1] = np.nan  # last column: process 1's half
  safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
  status, out = run_pod(["--from=hf", "--to=orbax", f"--src={src}", f"--dst={tmp_path / 'x'}"], tmp_path)
  assert status == EXIT_USER_ERROR
  for text in out:
    assert f"error: HF checkpoint {src}: tensor 'model.embed_tokens.weight' in {file} holds NaN" in text, text
    assert "Traceback" not in text
  assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------
# One process of a pod run: `python -m tests.test_checkpoint_multihost FORMAT SRC MESH DUMP` ("" = none).
# --------------------------------------------------------------------------
def _worker(fmt, src, mesh, dump):
  """Imports SRC onto MESH, each process reading its own slices (orbax: restores it, verified, without a
  partitioner); prints this process's bytes read, wq's spec and mesh, and (orbax) the fingerprints of the
  global arrays; writes this process's own shards to DUMP.<process>.npz if DUMP is given."""
  sharding.initialize_distributed()
  if fmt == "orbax":
    params, _ = orbax_io.load_params(src)
  else:
    partitioner = sharding.Partitioner.from_config(convert.parse_mesh(mesh))
    loader = hf.load_hf if fmt == "hf" else native.load_native
    params, _ = loader(src, shardings=partitioner.param_shardings)
  wq = params["layers"]["attention"]["wq"]
  assert not wq.is_fully_addressable
  result = dict(bytes_read=safetensors_io.bytes_read(), wq_spec=str(wq.sharding.spec),
                mesh=dict(wq.sharding.mesh.shape))
  if fmt == "orbax":
    result["fingerprints"] = integrity.fingerprints(params)
  if dump:
    np.savez(f"{dump}.{jax.process_index()}.npz", **own_shards(params))
  print("RESULT " + json.dumps(result), flush=True)


def own_shards(params):
  """{"<leaf>|<start>:<stop>,...": the block} of every shard this process's devices hold."""
  out = {}
  for name, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = "/".join(str(k.key) for k in name)
    for shard in x.addressable_shards:
      bounds = ",".join("{}:{}".format(*s.indices(n)[:2]) for s, n in zip(shard.index, x.shape))
      out[f"{leaf}|{bounds}"] = np.asarray(shard.data)
  return out


def assembled(dump, like):
  """The full arrays put together from every process's `own_shards` dump; a part no process held stays NaN."""
  full = {name: np.full(x.shape, np.nan, x.dtype) for name, x in like.items()}
  for p in range(PROCESSES):
    for key, block in np.load(f"{dump}.{p}.npz").items():
      leaf, bounds = key.split("|")
      full[leaf][tuple(slice(*map(int, b.split(":"))) for b in bounds.split(","))] = block
  return full


if __name__ == "__main__":
  _worker(*sys.argv[1:])
