"""Random tiny HF Qwen2 / Llama models for parity tests (built with transformers, no download)."""


QWEN = dict(arch="Qwen2", vocab_size=256, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=10000.0)
# Llama-3.1 rope scaling, an explicit head_dim != hidden/heads, and all-four
# attention biases, so each optional path of the mapping is exercised.
LLAMA = dict(arch="Llama", vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
             tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=16),
             rope_theta=500000.0, max_position_embeddings=256)


def make_hf_model(spec: dict, seed: int = 0):
  """A transformers model with every weight (norms, biases too) random and non-trivial."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  spec = dict(spec)
  arch = spec.pop("arch")
  config = getattr(transformers, f"{arch}Config")(**spec)
  m = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      # Weights large enough that a wrong transpose or rope convention shows.
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return m
