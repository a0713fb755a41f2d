"""Each sub-package is one pipeline; its ``__init__`` registers it (see common/registry.py)."""
