"""Method registry: the one place a method name is bound to its config class and its per-layer module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, MethodConfig

if TYPE_CHECKING:  # methods.base imports nothing from here, but the method files import this module
    from .methods.base import MethodModule

#: method name -> config class (public: ``attndenoise.METHODS``)
METHODS: dict[str, type[MethodConfig]] = {}
_MODULES: dict[str, type[MethodModule[Any]]] = {}


def register(config_cls: type[MethodConfig], module_cls: type[MethodModule[Any]]) -> None:
    """Bind ``config_cls.name`` to its config class and module class."""
    name = config_cls.name
    if not name:
        raise ValueError(f"{config_cls.__name__} has no method name")
    METHODS[name] = config_cls
    _MODULES[name] = module_cls


def _known() -> str:
    return ", ".join(sorted(METHODS))


def config_class(name: str) -> type[MethodConfig]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; known methods: {_known()}") from None


def module_class(config: MethodConfig) -> type[MethodModule[Any]]:
    return _MODULES[config.name]


def config_for(name: str, **overrides: Any) -> MethodConfig:
    """A validated config for method ``name``; unknown names, fields or bad values raise :class:`ConfigError`."""
    cls = config_class(name)
    return cls.from_dict(overrides)


def trainable_methods() -> list[str]:
    """Names of the methods with parameters to train (every one but the inference-only SRA), sorted."""
    return sorted(n for n, c in METHODS.items() if c.trainable)


def inference_methods() -> list[str]:
    """Names of the inference-only methods (nothing to train: SRA), sorted."""
    return sorted(n for n, c in METHODS.items() if not c.trainable)


def two_map_methods() -> frozenset[str]:
    """Names of the methods that compute two attention maps per head (``MethodConfig.two_maps``)."""
    return frozenset(n for n, c in METHODS.items() if c.two_maps)


def mergeable_methods() -> list[str]:
    """Names of the methods whose module can fold into base weights (``MethodModule.mergeable``), sorted."""
    return sorted(n for n, m in _MODULES.items() if m.mergeable)
