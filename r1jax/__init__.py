"""r1jax: the DeepSeek-R1 training system in JAX.

Layers (imports point down this list only; WORKSPACE.md has the table):
  core/        config, model, HF io, tokenizer, sharding, weights, checkpoints, metrics
  generation/  the jitted sampler and the engine (k completions per prompt → host samples)
  data/        row schema + adapters, grain pipelines, preference pairs, the synthetic world
  rewards/     rule rewards, sandbox, reward models, composition, the host process pool
  train/       state + optimizer, batch types, the one update step, losses, advantages, loop
  evaluation/  grading, pass@k / cons@k reports, the held-out suite
  stages/      one file per stage (sft, rl, reward_model, eval, pipeline, smoke) + registry

Dimension letters in tensor names (`logits_NxTxV`), each with one meaning everywhere:
  B prompts (or sequences, outside RL)    G group size: completions per prompt
  N rows: B·G sequences, or packed rows   S prompt tokens (left-padded)
  T tokens: completion tokens in RL, sequence tokens in SFT (right-padded)
  Q tokens of a whole row: S + T, or a packed row's width
  C reward components                     O decode slots (the rows still decoding, ≤ N)
  M mini-batches per rollout              A micro-batches per update (accumulation)
  V vocab   D model width   F MLP width   H heads   K kv heads   L layers
  J query heads per kv head (H = K·J)     E fused projection width (q|k|v or gate|up)
  X key / KV-cache positions (attention)  R rotary frequencies (h / 2)
  W positions per logits chunk            U logits chunks (T = U·W)
  Y keys in one query block's window      Z packed rows attended side by side
  I lane steps (rows / Z)
Lower case, a width inside one head or token: h head dim, k top-k tokens recorded.
`P` is only ever jax.sharding.PartitionSpec.
"""
