"""Neural network parts: blocks, codebooks, bottlenecks and the autoencoder that composes them."""
