"""Builder specs: how a config names a model or a dataset builder.

    small_cnn                               a built-in name (models.MODELS, data.DATASETS)
    mlp(hidden=[800, 800], dropout=0.5)     a built-in builder with keyword arguments
    my_pkg.nets:wide_mlp                    any importable builder, `module:attribute`
    my_pkg.nets:wide_mlp(hidden=[1200])     ... with keyword arguments

Arguments are Python literals only (numbers, strings, booleans, None, lists, tuples, dicts):
a spec is parsed with `ast`, never evaluated, so a config stays data. An import path imports
its module, as `python -c "import my_pkg.nets"` would from the current directory; the run's
config.yaml keeps the spec as written, so a later KD run, `export` or `report` rebuilds the
same model. Pure stdlib: config.py checks the syntax before torch is imported.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SpecError(ValueError):
    """A spec that does not parse, import or bind; config.ConfigError turns it into one line."""


@dataclass(frozen=True)
class Spec:
    target: str
    """A registered name, or an import path `package.module:attribute`."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    text: str = ""

    @property
    def is_import_path(self) -> bool:
        return ":" in self.target

    def __str__(self) -> str:
        return self.text or self.target


def parse(text: str) -> Spec:
    """`name`, `name(k=literal, ...)`, `pkg.mod:attr` or `pkg.mod:attr(k=literal, ...)`."""
    text = text.strip()
    head, paren, rest = text.partition("(")
    target = head.strip()
    if not (_NAME.match(target) or _PATH.match(target)):
        raise SpecError(f"{text!r} is not a builder name, `package.module:builder`, or either with (keyword=value, ...)")
    if not paren:
        return Spec(target, (), text)
    if not rest.rstrip().endswith(")"):
        raise SpecError(f"{text!r}: the arguments must end with ')'")
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
    except SyntaxError as e:
        raise SpecError(f"{text!r}: the arguments do not parse ({e.msg})") from None
    if not isinstance(call, ast.Call) or call.args:
        raise SpecError(f"{text!r}: arguments are keyword=value only, e.g. mlp(hidden=[800, 800], dropout=0.5)")
    kwargs = []
    for kw in call.keywords:
        if kw.arg is None:
            raise SpecError(f"{text!r}: '**' is not allowed; arguments are keyword=value")
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            raise SpecError(f"{text!r}: {kw.arg}= must be a literal (number, string, true/false as True/False, None, "
                            "list, tuple or dict)") from None
        kwargs.append((kw.arg, value))
    return Spec(target, tuple(kwargs), text)


def split(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping commas inside brackets: the form a list of
    models takes on the command line (`--set models=mlp(hidden=[800,800]),small_cnn`)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def resolve(text: str, registry: Mapping[str, Callable], user: Mapping[str, Callable] | None, *,
            fixed: int, what: str) -> Callable:
    """The builder a spec names, with its keyword arguments bound (functools.partial).
    `user` builders (the Python API's) win over the registry; a name that is neither, an import
    path that does not import or names no callable, and arguments the builder does not take are
    a SpecError of one line. `fixed`: how many positional arguments the framework passes
    ((input_shape, num_classes) for a model: 2; the data config for a dataset: 1)."""
    user = user or {}
    if text in user:  # the Python API may register a name that is not a valid spec: it is used as is
        return user[text]
    spec = parse(text)
    if spec.is_import_path:
        builder = _import(spec.target)
    elif spec.target in user:
        builder = user[spec.target]
    elif spec.target in registry:
        builder = registry[spec.target]
    else:
        known = ", ".join(sorted({*registry, *user}))
        raise SpecError(f"unknown {what} {spec.target!r}; allowed: {known}, or an importable `package.module:builder`")
    if not callable(builder):
        raise SpecError(f"{spec.target} is a {type(builder).__name__}, not a {what} builder (a function or class)")
    kwargs = dict(spec.kwargs)
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some builtins have no signature: let the call say
        signature = None
    if signature is not None:
        try:
            signature.bind(*([None] * fixed), **kwargs)
        except TypeError as e:
            params = [p for i, p in enumerate(signature.parameters) if i >= fixed]
            raise SpecError(f"{spec}: {e}; {spec.target} takes {fixed} positional argument(s) from the framework"
                            + (f" and the keywords {', '.join(params)}" if params else " and no keywords")) from None
    if not kwargs:
        return builder
    bound = functools.partial(builder, **kwargs)
    bound.__qualname__ = str(spec)  # what error messages and tables call it
    return bound


@functools.cache
def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise SpecError(f"{path!r} does not import ({type(e).__name__}: {e}); the module must be importable where "
                        "the run starts (the current directory, an installed package or PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{path!r}: module {module_name!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj
