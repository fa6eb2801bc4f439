"""Generation: the jitted KV-cache sampler and the engine that turns it into host samples."""
