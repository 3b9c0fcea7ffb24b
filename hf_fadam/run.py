"""Run a training script with ``--optim fadam`` available: ``python -m hf_fadam.run script.py [script args...]``.

The explicit alternative to the start-up hook (``hf_fadam_autoload.pth``), for when the hook is off
(``HF_FADAM_AUTOREGISTER=0``), was not installed (``python -S``, ``-I``, unusual installs) or should not be relied on.
It calls ``hf_fadam.register()``, then runs the script as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` set as
``python script.py ...`` would set them. ``-m module`` runs a module instead of a file. Under launchers::

    python -m hf_fadam.run run_clm.py --optim fadam --optim_args "clip=1.0,p=0.5" ...
    torchrun --nproc_per_node 2 -m hf_fadam.run run_clm.py --optim fadam ...
    accelerate launch -m hf_fadam.run run_clm.py --optim fadam ...
    python -m hf_fadam.run -m trl.scripts.sft --optim fadam ...
"""

from __future__ import annotations

import os
import re
import runpy
import sys


USAGE = "usage: python -m hf_fadam.run (script.py | -m module) [arguments for the script ...]"


def help_text() -> str:
    """The ``--help`` text: the usage line, then this module's docstring as plain text (no reStructuredText)."""
    text = __doc__.split("\n\n", 1)[1].rstrip()
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)  # :func:`hf_fadam.register` -> hf_fadam.register
    text = text.replace("``", "")
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)  # "Under launchers::" -> "Under launchers:"
    return f"{USAGE}\n\n{text}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        raise SystemExit(0 if argv else 2)

    if argv[0] == "-m" and len(argv) < 2:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if argv[0] != "-m" and not os.path.exists(argv[0]):
        print(f"hf_fadam.run: can't open file {argv[0]!r}: no such file", file=sys.stderr)
        raise SystemExit(2)

    from hf_fadam.integrations.transformers import register

    register()
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]  # runpy replaces argv[0] with the module's file
        sys.path[0] = os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, args = argv[0], argv[1:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
