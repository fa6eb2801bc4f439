"""r1jax: a JAX-native reimplementation of the DeepSeek-R1 training system."""
