"""A plain PyTorch GRPO iteration, the side-by-side reference for bench_grpo.py.

What a PyTorch GRPO trainer does per step with HF generation (TRL's GRPOTrainer
without vLLM, μ = 1, f32 params, bf16 via autocast): `generate` G samples per prompt with the KV cache; score
them on the host; group-normalise the rewards; then one update: policy
forward with grad, reference forward without, clipped surrogate + β·k3 per
token ("grpo" aggregation: per-sequence mean, then batch mean), backward,
global-norm clip 1.0 and AdamW. Old logprobs are the policy's own, detached
(the μ = 1 shortcut). Same checkpoint, prompts, reward and sizes as r1jax's side.
"""

import copy
import time

import numpy as np


def make_step(hf_dir: str, prompts: list[list[int]], group: int, completion: int,
              beta: float, dtype: str, reward_fn):
  """step(i) -> {"rollout_s", "reward_s", "update_s", "step_s"} for one GRPO iteration."""
  import torch
  import transformers
  # f32 params and AdamW, like r1jax's side; bf16 compute through autocast.
  policy = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  compute = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  ref = copy.deepcopy(policy).eval().requires_grad_(False)
  opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
  s = max(map(len, prompts))
  ids = np.zeros((len(prompts), s), np.int64)
  pmask = np.zeros((len(prompts), s), np.int64)
  for i, p in enumerate(prompts):
    ids[i, s - len(p):], pmask[i, s - len(p):] = p, 1
  ids, pmask = torch.tensor(ids), torch.tensor(pmask)
  gen_kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=completion,
                min_new_tokens=completion, num_return_sequences=group, use_cache=True,
                pad_token_id=0, eos_token_id=None)

  def token_logp(model, seq, mask, positions):
    logits = model(input_ids=seq, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, s - 1:-1].float()  # temperature 1
    return torch.log_softmax(logits, -1).gather(-1, seq[:, s:, None])[..., 0]

  def step(i):
    torch.manual_seed(i)
    t0 = time.perf_counter()
    policy.eval()
    with torch.no_grad(), compute():
      seq = policy.generate(input_ids=ids, attention_mask=pmask, **gen_kw)
    t1 = time.perf_counter()
    comp = seq[:, s:].numpy()
    rewards = reward_fn(comp, np.ones_like(comp, bool))
    r = rewards.reshape(-1, group)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    adv = torch.tensor(adv, dtype=torch.float32)[:, None]
    t2 = time.perf_counter()
    policy.train()
    mask = torch.cat([pmask.repeat_interleave(group, 0), torch.ones_like(seq[:, s:])], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with compute():
      logp = token_logp(policy, seq, mask, positions)
      with torch.no_grad():  # β = 0 needs no reference, as on r1jax's side
        ref_logp = token_logp(ref, seq, mask, positions) if beta else logp.detach()
    ratio = torch.exp(logp - logp.detach())
    surrogate = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    d = ref_logp - logp
    per_token = -surrogate + beta * (torch.exp(d) - d - 1)
    loss = per_token.mean(1).mean()  # every completion token is real here (no EOS)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0}

  return step
