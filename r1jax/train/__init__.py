"""Training: state + optimizer, batch types, the one update step, losses, advantages, loop."""
