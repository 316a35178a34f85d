"""The GRPO run's curves: training reward and accuracy per step, held-out accuracy at each eval.

    python -m ministral_jax.train.grpo_report <workdir>     (the job writes it when it finishes)

Reads `<workdir>/metrics.jsonl`; writes `<workdir>/grpo.png` atomically.
"""

from __future__ import annotations

import io
import json
import sys

from etils import epath

from ministral_jax import files

PLOT_FILE = "grpo.png"


def curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value)]} for the plotted metrics, one value per step (a resumed run's last wins)."""
  wanted = ("reward_mean", "accuracy", "eval_accuracy", "mean_length")
  seen: dict[str, dict[int, float]] = {k: {} for k in wanted}
  for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    for k, v in row.items():
      if k in wanted or k.startswith("eval_pass@") or k == "eval_sampled_accuracy":
        seen.setdefault(k, {})[int(row["step"])] = float(v)
  return {k: sorted(v.items()) for k, v in seen.items()}


def plot(workdir: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  c = curves(workdir)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  if c["accuracy"]:  # 8 prompts a step are noisy: their 10-step mean
    steps, values = zip(*c["accuracy"])
    top.plot(steps, values, color="C1", alpha=0.3, label="train accuracy (sampled)")
    window = [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]
    top.plot(steps, window, color="C1", label="train accuracy, 10-step mean")
  held_out = [("eval_accuracy", "held-out accuracy (greedy)"),
              ("eval_sampled_accuracy", "held-out accuracy (sampled, pass@1)")]
  held_out += [(k, f"held-out {k[5:]}") for k in c if k.startswith("eval_pass@")]
  for i, (key, label) in enumerate(held_out):
    if c.get(key):
      steps, values = zip(*c[key])
      top.plot(steps, values, marker="o", color="C0" if i == 0 else f"C{i + 1}", label=label)
  top.set_ylabel("reward / accuracy")
  top.legend()
  top.grid(alpha=0.3)
  if c["mean_length"]:
    steps, values = zip(*c["mean_length"])
    bottom.plot(steps, values, color="gray")
  bottom.set_ylabel("mean response length (tokens)")
  bottom.set_xlabel("GRPO step")
  bottom.grid(alpha=0.3)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  out = epath.Path(workdir) / PLOT_FILE
  files.write_text(out, buf.getvalue())
  return str(out)


if __name__ == "__main__":
  print(plot(sys.argv[1]))
