"""dalle-together: train a DALL-E-style text-to-image transformer together over the Internet."""

__version__ = "0.1.0"
