"""The errors lorakit raises. Every message names the module, file or value at fault."""

from __future__ import annotations

import difflib


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A method or call was given an invalid value (rank <= 0, alpha <= 0, dropout outside [0, 1))."""


class TargetNotFoundError(LorakitError, ValueError):
    """A target pattern matched no module of the model."""

    def __init__(self, targets, module_names):
        wanted = [targets] if isinstance(targets, str) else list(targets)
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if n})
        close = sorted({c for t in wanted for c in difflib.get_close_matches(str(t).rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)})
        hint = f"; close module names: {', '.join(close)}" if close else f"; module names include: {', '.join(leaves[:12])}"
        super().__init__(f"targets {wanted!r} matched no adaptable module{hint}")


class UnsupportedLayerError(LorakitError, TypeError):
    """A targeted module is of a type no method knows how to adapt."""


class AdapterExistsError(LorakitError, KeyError):
    """An adapter of that name is already on the model."""

    def __str__(self):
        return self.args[0]


class AdapterNotFoundError(LorakitError, KeyError):
    """No adapter of that name is on the model."""

    def __str__(self):
        return self.args[0]


class AdapterFileError(LorakitError, OSError):
    """An adapter directory or tensor file is missing, truncated, corrupt, incomplete, not an adapter we can
    read, or cannot be written where asked (a path that is a file, a read-only directory)."""


class ShapeMismatchError(LorakitError, ValueError):
    """An adapter's tensors do not fit the model they are loaded into."""


class MergeError(LorakitError, RuntimeError):
    """A merge or unmerge cannot be done (non-finite delta, grouped conv, wrong state)."""
