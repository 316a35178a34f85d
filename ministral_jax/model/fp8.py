"""fp8 training of the decoder through qwix: e4m3 forward, e5m2 backward, fp32 master weights.

`training_module(cfg, fp8=True)` is the plain `transformer.Transformer(cfg)`
wrapped by `qwix.quantize_model`. Nothing about the parameters changes: the
same tree, keys, shapes and dtypes (`cfg.param_dtype`, fp32 in training), so
checkpoints, optimizer state, sharding rules and `abstract_params` are shared
with the bf16 path, and a run can switch fp8 on or off between restarts.
qwix fake-quantises inside the matmuls only; AdamW keeps updating the fp32
master weights and the quantisation is recomputed from them on every step.

What is quantised: the seven weight matmuls of every decoder block
(`layers/attention`: wq, wk, wv, wo; `layers/feed_forward`: w1, w3, w2),
nearly all of the FLOPs at real sizes. Forward operands go to float8_e4m3fn
(more mantissa, for values); the incoming gradients of the backward matmuls
go to float8_e5m2 (more exponent, because gradients span a wider range).
Scales are dynamic absmax along each operand's non-contracted axes: per
token for activations and gradients, per output channel for weights. The
backward reuses the e4m3 forward operands as residuals, so both backward
dots (input gradient and weight gradient) are e5m2 x e4m3.

What stays in the compute dtype (`cfg.dtype`, bf16 in training), and why.
DeepSeek-V3's fp8 recipe draws the same line, and Transformer Engine makes
fp8 attention opt-in.
  - Attention scores and values (q k^T, softmax(.) v). They have no weights,
    and on TPU/GPU they run in Pallas or cuDNN flash kernels, which qwix
    cannot see. Quantising them in the XLA path would make CPU/TPU numerics
    differ from the GPU's. qwix intercepts every einsum under a matching
    module path, so `WeightMatmulQtProvider` leaves a dot unquantised unless
    it reads a parameter of the module it runs in.
  - The embedding lookup. It is a gather, not a matmul, so fp8 saves nothing.
  - RMSNorm, RoPE, SwiGLU's gate and the residual adds. They are elementwise.
  - The LM head. The losses (`train/losses.py`) take the final hidden states
    and `transformer.output_matrix(...)` and run the chunked vocab matmul
    themselves, outside the module, so qwix never sees it. Keeping it in the
    compute dtype is deliberate: the logits feed the softmax over 131K tokens,
    so fp8 error there would go straight into the loss.
    (`Transformer.logits`, used without `return_hidden`, is not quantised
    either: the rule's module path excludes the root module.)

Speed: on CPU the compiled program rounds to fp8 but runs every dot in f32,
so fp8 only costs there (about 1.3x the bf16 compile, the quantise ops on
top). Whether XLA emits native fp8 GEMMs for these e4m3/e5m2 dots on
H100/H200 is to be measured there, not assumed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.utils import flax_util

from ministral_jax.model import transformer
from ministral_jax.model.config import ModelConfig

FORWARD_QTYPE = jnp.float8_e4m3fn
BACKWARD_QTYPE = jnp.float8_e5m2
# Module paths as qwix sees them (the scanned, possibly rematerialised block is
# named "layers" whatever `scan_layers` and `remat_policy` say).
QUANTIZED_MODULES = r"layers/(attention|feed_forward)"


def fp8_rule() -> qwix.QtRule:
  """The one rule: dynamic absmax fp8 for the block matmuls, no collected statistics.

  `act_static_scale=False` keeps the variables to `params` only: static
  scales would add a `quant_stats` collection to every apply and checkpoint.
  """
  return qwix.QtRule(
      module_path=QUANTIZED_MODULES,
      weight_qtype=FORWARD_QTYPE,
      act_qtype=FORWARD_QTYPE,
      bwd_qtype=BACKWARD_QTYPE,
      act_static_scale=False,
  )


class WeightMatmulQtProvider(qwix.QtProvider):
  """A `QtProvider` that quantises only the dots that read a parameter.

  A plain `QtRule` matches module paths and op names, and the attention
  module's einsums are all "einsum" under "layers/attention": the four
  projections and those of the attention kernel (q k^T and p v per tile).
  Reading a parameter is what tells them apart.
  """

  def einsum(self, einsum_str: str, *operands: jax.Array, **kwargs: Any) -> jax.Array:
    if not any(map(_is_param, operands)):
      return jnp.einsum(einsum_str, *operands, **kwargs)  # interception is off inside a provider
    return super().einsum(einsum_str, *operands, **kwargs)

  def dot_general(self, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    if not (_is_param(lhs) or _is_param(rhs)):
      return jax.lax.dot_general(lhs, rhs, *args, **kwargs)
    return super().dot_general(lhs, rhs, *args, **kwargs)


def _is_param(x: Any) -> bool:
  """Whether `x` is (a cast of) one of the current module's parameters.

  qwix's `find_param` follows the tracer back through `astype`, but not in
  every trace: in `nn.scan`'s first trace of the block it falls back to
  matching shapes and gives up when two parameters share one (wk/wv, w1/w3).
  A shape match is enough here: the dots without weights are the attention
  core's, whose operands have a rank no parameter of the block has.
  """
  if flax_util.find_param(x) is not None:
    return True
  params = flax_util.get_current_module().scope._collection("params")  # pylint: disable=protected-access
  return getattr(x, "shape", None) in {getattr(flax_util.unbox(p), "shape", None) for p in params.values()}


def training_module(cfg: ModelConfig, fp8: bool) -> nn.Module:
  """The decoder to train: the plain Transformer, or the same one with fp8 block matmuls.

  Both are applied identically (`.apply({"params": params}, tokens, positions,
  segment_ids, return_hidden=True)`) with the same params, so a trainer picks
  one with its `fp8` flag and changes nothing else.
  """
  model = transformer.Transformer(cfg)
  if not fp8:
    return model
  return qwix.quantize_model(model, WeightMatmulQtProvider([fp8_rule()]))


def dot_operand_types(hlo_text: str) -> list[tuple[str, ...]]:
  """The operand element types of every dot in StableHLO text, e.g. `("f8E4M3FN", "f8E4M3FN")`.

  For tests and for checking a real run's lowered step: which matmuls
  actually are fp8 is a property of the program, not of the config.
  """
  return [_operand_types(line) for line in hlo_text.splitlines() if "stablehlo.dot_general" in line]


def _operand_types(line: str) -> tuple[str, ...]:
  signature = line.rsplit(":", 1)[-1]  # "(tensor<2x16x64xf8E4M3FN>, tensor<...>) -> tensor<...>"
  inputs = signature.split("->")[0]
  return tuple(t.split(">")[0].rsplit("x", 1)[-1] for t in inputs.split("tensor<")[1:])

