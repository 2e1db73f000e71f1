"""vqkit: discrete (VQ, residual VQ, FSQ) and continuous (AE, VAE) latent codes of speech and
images, and a low-bitrate speech codec built on them."""

from vqkit.errors import VqkitError

__version__ = "0.1.0"
__all__ = ["VqkitError", "load_codec"]


def load_codec(model: str = "default"):
    """Load a speech codec: ``"default"`` (shipped), a run folder or a checkpoint path."""
    from vqkit.codec.codec import load_codec as _load

    return _load(model)
