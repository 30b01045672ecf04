"""higgs-tune: fine-tuning toolkit for Higgs Audio v2."""

__version__ = "0.1.0"
