"""Optional dependencies: which extra provides a module, and the one line that says how to install it.

The base install is the torch-free runtime; training, export, verify, eval, demo and the PyTorch reference need
the `torch` extra. Commands check it before they create anything, and the CLI turns a late ImportError of one of
these modules into the same line.
"""

from __future__ import annotations

import importlib.util

from .errors import UserError

TORCH_EXTRA_INSTALL = 'pip install "ddpm-deploy[torch]"'
# top-level modules of the `torch` extra (pyproject.toml), in the order a command usually imports them
TORCH_EXTRA_MODULES = ("torch", "diffusers", "safetensors", "sklearn", "onnxscript", "matplotlib")
# every extra whose absence a command must name in one line: extra -> its top-level modules (pyproject.toml)
EXTRA_MODULES = {"torch": TORCH_EXTRA_MODULES, "openvino": ("openvino",), "int8": ("nncf",),
                 "serve": ("fastapi", "starlette", "uvicorn", "httpx", "ray")}
_CPU_HINT = "on a machine without a GPU first: pip install torch --index-url https://download.pytorch.org/whl/cpu"


def torch_extra_message(module: str, what: str = "this command") -> str:
    return f"{what} needs the torch extra ({module} is not installed): {TORCH_EXTRA_INSTALL} ({_CPU_HINT})"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def require_torch_extra(what: str = "this command") -> None:
    """Raise a one-line UserError naming the extra if a module of the torch extra is missing (cheap: no import)."""
    for module in TORCH_EXTRA_MODULES:
        if not _installed(module):
            raise UserError(torch_extra_message(module, what))


def extra_message(extra: str, module: str, what: str = "this command") -> str:
    if extra == "torch":
        return torch_extra_message(module, what)
    return f'{what} needs the {extra} extra ({module} is not installed): pip install "ddpm-deploy[{extra}]"'


def require_extra(extra: str, what: str = "this command", modules: tuple | None = None) -> None:
    """Like require_torch_extra for any extra; `modules`: the ones this command imports (default: all of them)."""
    for module in modules or EXTRA_MODULES[extra]:
        if not _installed(module):
            raise UserError(extra_message(extra, module, what))


def missing_extra(e: ImportError) -> str | None:
    """The install line for an ImportError of a module of one of the extras, or None for any other import failure."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    for extra, modules in EXTRA_MODULES.items():
        if name in modules:
            return extra_message(extra, name)
    return None
