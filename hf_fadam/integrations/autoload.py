"""Start-up hook: ``--optim fadam`` in unmodified scripts, without importing anything heavy at interpreter start.

The package installs ``hf_fadam_autoload.pth`` into site-packages. Python runs its one line at every interpreter
start; that line reads the opt-out variable, locates this file *without* importing ``hf_fadam`` (whose ``__init__``
imports torch), executes it and calls :func:`install`. :func:`install` only puts a small finder on ``sys.meta_path``.
When the process later imports

- ``transformers.training_args``: the finder lets it load, then adds ``OptimizerNames.FADAM`` (so a parser built
  afterwards accepts ``--optim fadam``, and JSON/YAML configs and ``training_args.bin`` files with it load);
- ``transformers.trainer``: the finder lets it load, then calls :func:`hf_fadam.register` (the Trainer builds FAdam).

A process that never imports transformers pays only for reading this file. Set ``HF_FADAM_AUTOREGISTER=0`` to turn
the hook off; ``python -m hf_fadam.run script.py ...`` and ``hf_fadam.register()`` work without it. A failure inside
the hook never breaks the import that triggered it: it becomes a warning.

This module must import only the standard library at top level.
"""

import os
import sys


ENV_VAR = "HF_FADAM_AUTOREGISTER"
_OFF = ("0", "false", "no", "off")
_MARK = "_hf_fadam_autoload"


def enabled() -> bool:
    """False when ``HF_FADAM_AUTOREGISTER`` is 0, false, no or off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def _on_training_args(module_name: str) -> None:
    from hf_fadam.integrations.transformers import register_enum

    register_enum()


def _on_trainer(module_name: str) -> None:
    from hf_fadam.integrations.transformers import register

    register()


_HOOKS = {"transformers.training_args": _on_training_args, "transformers.trainer": _on_trainer}


def _run_hook(hook, module_name: str) -> None:
    try:
        hook(module_name)
    except Exception as exc:  # never break the user's import
        import warnings

        warnings.warn(
            f"hf_fadam could not enable --optim fadam after importing {module_name}: {exc!r}. Call "
            f"hf_fadam.register() to see the full error, or set {ENV_VAR}=0 to turn this hook off.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PostImportLoader:
    """Wraps a module's loader for one import: run the real ``exec_module``, restore the loader, then the hook."""

    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            # Leave no trace of the wrapper on the module (inspect, importlib.reload, pickle see the real loader).
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        _run_hook(self._hook, module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder:
    """A ``sys.meta_path`` entry that finds nothing itself; it wraps the loader of the modules in ``hooks``."""

    _hf_fadam_autoload = True

    def __init__(self, hooks):
        self._hooks = dict(hooks)
        self._busy = set()

    def find_spec(self, name, path=None, target=None):
        hook = self._hooks.get(name)
        if hook is None or name in self._busy:
            return None
        self._busy.add(name)
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(name)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PostImportLoader(spec.loader, hook)
        return spec

    def invalidate_caches(self):
        pass


def installed() -> bool:
    """Whether the hook is on ``sys.meta_path`` in this process."""
    return any(getattr(finder, _MARK, False) for finder in sys.meta_path)


def install(force: bool = False) -> bool:
    """Put the hook on ``sys.meta_path`` (once). Returns whether it is installed.

    Honors ``HF_FADAM_AUTOREGISTER=0`` unless ``force``. Modules already imported get their hook at once.
    """
    if not (force or enabled()):
        return False
    if not installed():
        sys.meta_path.insert(0, _PostImportFinder(_HOOKS))
    for module_name, hook in _HOOKS.items():
        module = sys.modules.get(module_name)
        if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _run_hook(hook, module_name)
    return True
