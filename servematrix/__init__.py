"""servematrix: an end-to-end serving regression suite for vLLM."""

__version__ = "0.1.0"
