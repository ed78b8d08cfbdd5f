"""incontext: self-hostable in-context image editing (FLUX.1 Kontext-style)."""

__version__ = "0.1.0"
