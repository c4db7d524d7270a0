"""One file per method; ``lorakit/registry.py`` lists them (``methods/base.py`` is the contract they keep)."""
