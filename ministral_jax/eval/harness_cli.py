"""The harness's own command line, with our backend registered as `--model ministral_jax`.

    python -m ministral_jax.eval.harness_cli run --model ministral_jax \\
        --model_args checkpoint=/ckpt/ministral3_3b_hf,mesh=fsdp=-1 --tasks mmlu,arc_challenge --num_fewshot 5 \\
        --batch_size 16 --output_path results/

Every flag is lm-eval's (`lm_eval --help`). model_args: checkpoint (orbax, HF or Mistral-native), tokenizer
(default: the checkpoint's), batch_size, max_length, max_gen_toks, mesh (axes joined by `+`, e.g.
`mesh=data=2+fsdp=-1`), add_bos_token, seed; `--apply_chat_template` renders prompts in Mistral's instruct
format (SFT's). On a pod every host runs the same command.
"""

from ministral_jax import sharding


def main() -> None:
  sharding.initialize_distributed()
  from ministral_jax.eval import harness_model  # noqa: F401  registers --model ministral_jax
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  main()
