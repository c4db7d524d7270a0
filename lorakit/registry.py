"""The registry: every method lorakit knows, by name, and the one place that lists them.

A method is a recipe class (a frozen dataclass subclassing ``lorakit.methods.base.Method``) in a file of its
own, plus one ``register`` line here (or, for a method that lives outside lorakit, one ``lk.register`` call in
its own module). Everything that lists or looks up methods asks the registry: the ``lk.<Method>``
exports, loading a saved adapter by its method's name, the CLI's ``--method`` choices and each method's
options (its fields, their types, defaults and attribute docstrings), the parameter calculator and
the shared test matrix.

Packages can also make a method known to the ``lorakit`` command without any import by the user: an
entry point in the ``lorakit.methods`` group, naming a module that calls ``lk.register`` or a recipe class.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.metadata
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.errors import ConfigError
from lorakit.methods import adalora, dora, lora, lora_xs, pissa, svf, svft
from lorakit.methods.base import Method, setting_names


@dataclass(frozen=True)
class Entry:
    """One registered method: the name users give, its recipe class and the settings that name implies."""

    name: str
    recipe: type
    defaults: types.MappingProxyType

    @property
    def summary(self) -> str:
        """The first line of the recipe's docstring."""
        return (inspect.getdoc(self.recipe) or self.recipe.__name__).splitlines()[0]

    def create(self, **settings: Any) -> Method:
        """The recipe with this entry's defaults and ``settings`` (unknown settings are a ConfigError)."""
        known = setting_names(self.recipe)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no setting {', '.join(unknown)}; it has {', '.join(sorted(known))}")
        return self.recipe(**{**self.defaults, **settings})


@dataclass(frozen=True)
class Option:
    """One setting of a method, as the CLI offers it."""

    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple | None = None
    optional: bool = False  # None is a value (the recipe's "unset")


_ENTRIES: dict[str, Entry] = {}
_plugins_loaded = False
DEFAULT = "lora"  # the method the commands use unless told


def register(recipe: type | str, name: str | None = None, **defaults: Any) -> type:
    """Make a method known to lorakit by ``name`` (default: the recipe's own ``name``); returns the recipe class.

    ``recipe`` is a frozen dataclass subclassing ``lorakit.methods.base.Method`` (or ``"module:Class"``).
    ``defaults`` are settings the name implies (``register(LoRA, "rslora", rslora=True)``). Registering the
    same class under the same name again is harmless; another class under a taken name is a ConfigError.
    """
    if isinstance(recipe, str):
        module, _, attribute = recipe.partition(":")
        recipe = getattr(importlib.import_module(module), attribute)
    if not (isinstance(recipe, type) and issubclass(recipe, Method) and dataclasses.is_dataclass(recipe)
            and recipe.__dataclass_params__.frozen):
        raise ConfigError(f"lk.register needs a frozen dataclass subclassing lorakit.methods.base.Method, "
                          f"got {recipe!r}")
    own = getattr(recipe, "name", None)
    if not isinstance(own, str) or not own:
        raise ConfigError(f"lk.register: {recipe.__name__} needs a class attribute name = '...' (what saved "
                          "adapter files call it)")
    name = name or own
    fields = setting_names(recipe)
    if set(defaults) - fields:
        raise ConfigError(f"lk.register: {recipe.__name__} has no setting {sorted(set(defaults) - fields)}")
    taken = _ENTRIES.get(name)
    if taken is not None and (taken.recipe.__qualname__, taken.recipe.__module__) != (
            recipe.__qualname__, recipe.__module__):
        raise ConfigError(f"lk.register: the name {name!r} is taken by {taken.recipe.__module__}."
                          f"{taken.recipe.__qualname__}")
    _ENTRIES[name] = Entry(name, recipe, types.MappingProxyType(dict(defaults)))
    return recipe


def names() -> list[str]:
    """Every registered method name, in registration order (plugins' included)."""
    _load_plugins()
    return list(_ENTRIES)


def entry(name: str) -> Entry:
    """The registered method ``name``; a ConfigError listing the known ones (and close spellings) otherwise."""
    if name not in _ENTRIES:
        _load_plugins()
    if name not in _ENTRIES:
        close = difflib.get_close_matches(str(name), list(_ENTRIES), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} Registered: {', '.join(_ENTRIES)} (a method defined "
                          "elsewhere is registered by importing the module that calls lk.register)")
    return _ENTRIES[name]


def create(name: str, **settings: Any) -> Method:
    """The recipe registered as ``name`` with ``settings``: ``create("pissa", rank=16)``."""
    return entry(name).create(**settings)


def classes() -> dict[str, type]:
    """Every registered recipe class by its class name (what ``lk.<Method>`` exports)."""
    return {e.recipe.__name__: e.recipe for e in _ENTRIES.values()}


def from_peft(config: dict) -> Method | None:
    """The recipe a PEFT adapter_config.json describes, asked of every registered method; None if none reads it."""
    for recipe in dict.fromkeys(e.recipe for e in _ENTRIES.values()):
        made = recipe.from_peft(config)
        if made is not None:
            return made
    return None


def options(name: str) -> list[Option]:
    """The settings of method ``name``, from its recipe's fields: type, default (the name's own first) and the
    attribute docstring after each field."""
    e = entry(name)
    hints = typing.get_type_hints(e.recipe)
    docs = _field_docs(e.recipe)
    found = []
    for f in dataclasses.fields(e.recipe):
        kind, choices, optional = _plain_type(hints[f.name], e.recipe, f.name)
        default = e.defaults.get(f.name, f.default)
        found.append(Option(f.name, kind, default, docs.get(f.name, ""), choices, optional))
    return found


def _plain_type(hint, recipe: type, field: str) -> tuple[type, tuple | None, bool]:
    """(bool | int | float | str, Literal choices, whether None is allowed) of a field's annotation."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, optional
    if hint in (bool, int, float, str):
        return hint, None, optional
    raise ConfigError(f"{recipe.__name__}.{field}: a method setting is a bool, int, float, str or Literal "
                      f"(optionally | None), not {hint!r}")


def _field_docs(recipe: type) -> dict[str, str]:
    """Each field's attribute docstring (the string right after it), from the recipe class and its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(recipe.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):  # no source (built in, or defined in a REPL)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _load_plugins() -> None:
    """Import the ``lorakit.methods`` entry points once: modules that register methods, or recipe classes."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in importlib.metadata.entry_points(group="lorakit.methods"):
        loaded = point.load()
        if isinstance(loaded, type):
            register(loaded)


# --- lorakit's own methods: one line each ----------------------------------------------------------
register(lora.LoRA)
register(lora.LoRA, "rslora", rslora=True)
register(dora.DoRA)
register(pissa.PiSSA)
register(pissa.MiLoRA)
register(lora_xs.LoRAXS)
register(svf.SVF)
register(svft.SVFT)
register(adalora.AdaLoRA)
