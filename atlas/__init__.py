"""Feature Atlas: train sparse autoencoders and publish every feature as a static site."""

__version__ = "0.1.0"
