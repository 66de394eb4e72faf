"""bgminer: find the few images of a rare class in a sea of background."""

__version__ = "0.1.0"
