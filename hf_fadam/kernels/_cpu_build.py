"""Build, cache and load the C kernels of the CPU fused paths, from private directories only.

A kernel is compiled at first use by the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) with ``-O3
-march=native -fopenmp`` and loaded with ctypes. The shared library is cached in a directory named by a hash of
everything that determines the binary (``cpu_kernel-<key>``, see :func:`key_dir_name`): the source, the whole
compiler command (the compiler's path, the flag set, :data:`BASE_FLAGS` and :data:`LINK_FLAGS`), the compiler's
``--version``, the environment variables that change what it includes or links, the platform and the CPU. So a
changed kernel, flag, compiler or machine never loads a stale binary. The library is written to a temporary name
and renamed into place, so concurrent processes (DDP ranks, test workers) can build at the same time safely. The
first build takes about a second.

Loading a shared library runs its code (constructors) inside this process, so a library is loaded only from a path
that nobody else can write:

- Where: ``$HF_FADAM_CACHE_DIR`` (default ``~/.cache/hf_fadam``); if that cannot be used, ``hf_fadam-<uid>`` in the
  system temp dir (``$TMPDIR``, ...); if that cannot be used either, a fresh ``mkdtemp`` directory for this process
  (removed at exit). Directories this module creates are created with mode 0700.
- Before a library is loaded (or a cached build failure is believed), the key directory and each of its parents up
  to and including the cache root must be real directories (not symlinks below the root) owned by this user
  (``os.getuid()``) with no group or other write permission, and the library a regular file with the same owner and
  no group or other write permission. A directory that fails this is not used: a ``RuntimeWarning`` names it and the
  reason, and the build moves on to the next place. Nobody but this user (and root) can then swap the file between
  the check and ``dlopen``.
- Flags: the flag sets of :data:`FLAG_SETS` are tried in order, and the next one only when the compiler rejects one
  (or the built library does not load, e.g. no OpenMP runtime). A directory that cannot be written (read-only cache)
  moves the same flags to the next place; it never downgrades the flags. A rejection is cached next to where the
  library would be (``build-failed.txt``, keyed like the build), so a new process does not compile again a flag set
  that the same compiler already rejected; delete the file (or the directory) to retry.

A kernel module holds its library in a :class:`LazyLibrary`, which calls :func:`load` at first use and at most once
per process, success or failure.

``HF_FADAM_DISABLE_CPU_KERNEL=1`` makes :func:`load` refuse (the dispatcher then uses the foreach path). On
platforms without ``os.getuid`` (Windows) the owner and mode checks are skipped.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path


__all__ = [
    "BASE_FLAGS",
    "FLAG_SETS",
    "LINK_FLAGS",
    "BuildError",
    "LazyLibrary",
    "UnsafePathError",
    "build",
    "compiler",
    "key_dir_name",
    "load",
]

BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LINK_FLAGS = ["-lm"]
# Tried in order until one compiles and loads: native ISA + OpenMP, portable + OpenMP, then without the OpenMP
# runtime (the kernel is then single-threaded; -fopenmp-simd still lets the double-precision sums vectorize).
FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    ["-fopenmp-simd"],
    ["-march=native"],
    [],
)
FAILURE_FILE = "build-failed.txt"
DISABLE_ENV_VAR = "HF_FADAM_DISABLE_CPU_KERNEL"


class BuildError(RuntimeError):
    """The compiler rejected the source with these flags (the message has the command and its stderr)."""


class UnsafePathError(OSError):
    """A directory or file that another user could write: nothing is loaded from it."""


# --------------------------------------------------------------------------------------------------------------------
# compiler, key
# --------------------------------------------------------------------------------------------------------------------


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def _cpu_fingerprint() -> str:
    """Enough of the CPU's identity that a ``-march=native`` binary never runs on a CPU without its ISA."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        text += platform.processor()
    return text


# Read by gcc and clang: where headers (math.h, immintrin.h, omp.h), the compiler's own parts and libraries come from.
_COMPILER_ENV = ("CPATH", "C_INCLUDE_PATH", "COMPILER_PATH", "GCC_EXEC_PREFIX", "LIBRARY_PATH")
# The layout of the key's inputs; bump it when they change meaning.
_KEY_SCHEME = b"hf_fadam cpu kernel key 2"


def _command(cc: str, flags: list[str], source: str, out: str) -> list[str]:
    """The compiler command of a build (the one place it is spelled, for :func:`_compile` and the key)."""
    return [cc, *flags, *BASE_FLAGS, source, "-o", out, *LINK_FLAGS]


def key_dir_name(source: Path, cc: str, flags: list[str]) -> str:
    """The cache directory name of a build: ``cpu_kernel-`` and a hash of everything that determines the binary.

    That is the source's bytes (the ABI version is defined in it); the compile command with placeholders for the
    source and output paths (the compiler's path, the flag set, :data:`BASE_FLAGS`, :data:`LINK_FLAGS`); the
    compiler's resolved path and ``--version``; the environment variables of :data:`_COMPILER_ENV`; the OS,
    architecture and pointer width; and the CPU (``-march=native``). The Python version is not part of it: the
    library uses no Python or torch headers and is loaded through ctypes.
    """
    parts = [
        _KEY_SCHEME,
        source.read_bytes(),
        "\0".join(_command(cc, list(flags), "<source>", "<out>")).encode(),
        os.path.realpath(cc).encode(),
        _compiler_version(cc).encode(),
        "\0".join(f"{name}={os.environ.get(name, '')}" for name in _COMPILER_ENV).encode(),
        f"{sys.platform} {platform.system()} {platform.machine()} {8 * struct.calcsize('P')}-bit".encode(),
        _cpu_fingerprint().encode(),
    ]
    digest = hashlib.sha256()
    for part in parts:  # length-prefixed: no two different lists of parts hash the same bytes
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f"cpu_kernel-{digest.hexdigest()[:16]}"


def _lib_name(source: Path) -> str:
    return f"libhf{source.stem}.so"  # _fadam_cpu.c -> libhf_fadam_cpu.so


# --------------------------------------------------------------------------------------------------------------------
# private directories
# --------------------------------------------------------------------------------------------------------------------


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _check_private(path: Path, *, is_dir: bool, follow: bool = False) -> None:
    """Raise :class:`UnsafePathError` unless ``path`` is ours and not writable by group or others."""
    st = os.stat(path) if follow else os.lstat(path)
    kind = "directory" if is_dir else "file"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symbolic link, not a {kind}")
    if is_dir and not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file")
    uid = _uid()
    if uid is None:
        return
    if st.st_uid != uid:
        raise UnsafePathError(f"the {kind} {path} belongs to uid {st.st_uid}, not to this user (uid {uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"the {kind} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o}); "
            f"remove it or run `chmod go-w {path}`"
        )


def _check_chain(path: Path, root: Path, follow_root: bool) -> None:
    """Check ``path`` and every directory above it up to and including ``root``."""
    for directory in [path, *path.parents]:
        _check_private(directory, is_dir=True, follow=follow_root and directory == root)
        if directory == root:
            return
    raise UnsafePathError(f"{path} is not inside {root}")


def _private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (its parents with the default mode) unless it exists; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory") from None
    return path


def _cache_root() -> Path:
    env = os.environ.get("HF_FADAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hf_fadam"


_process_dir: Path | None = None


def _process_private_dir() -> Path:
    """A ``mkdtemp`` directory (mode 0700) for this process only, removed at exit."""
    global _process_dir
    if _process_dir is None or not _process_dir.is_dir():
        _process_dir = Path(tempfile.mkdtemp(prefix="hf_fadam-"))
        atexit.register(shutil.rmtree, _process_dir, ignore_errors=True)
    return _process_dir


def _shared_temp_root() -> Path:
    uid = _uid()
    return Path(tempfile.gettempdir()) / f"hf_fadam-{uid if uid is not None else 0}"


def _roots() -> Iterator[tuple[str, Callable[[], Path], bool]]:
    """The places to build in, in order, as (description, root, whether the root itself may be a symlink)."""
    yield "the cache directory", _cache_root, True  # configured by the user: ~/.cache may live elsewhere
    yield "the per-user temp directory", _shared_temp_root, False  # a shared dir: anyone could have made a link
    yield "a private temp directory of this process", _process_private_dir, False


def _warn_unsafe(exc: UnsafePathError) -> None:
    warnings.warn(
        f"hf_fadam: not loading or building the FAdam CPU kernel in a path that others can write: {exc}. "
        f"Using a private directory instead.",
        RuntimeWarning,
        stacklevel=2,
    )


# --------------------------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: str, flags: list[str], source: Path, out_dir: Path, lib: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)  # mode 0600
    os.close(fd)
    cmd = _command(cc, flags, str(source), tmp)
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.SubprocessError as exc:  # a timeout says nothing about the flags: not cached
            raise BuildError(f"building the FAdam CPU kernel failed: {exc}\ncommand: {' '.join(cmd)}") from None
        if proc.returncode != 0:
            message = (
                f"building the FAdam CPU kernel failed (exit {proc.returncode}).\ncommand: {' '.join(cmd)}\n"
                f"stderr:\n{proc.stderr.strip()}"
            )
            _write_private(out_dir / FAILURE_FILE, message)
            raise BuildError(message)
        # The linker creates its output with the umask's mode (0775 under umask 002): make it private.
        os.chmod(tmp, 0o700)
        os.replace(tmp, lib)  # atomic: a concurrent builder either sees no file or a complete one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def build(source: Path, cc: str, flags: list[str]) -> Path:
    """Compile ``source`` with ``flags`` unless a verified identical build is cached; return the library's path.

    Raises :class:`BuildError` when the compiler rejects the flags (also a rejection cached by an earlier process),
    and ``RuntimeError`` when no private place to build in can be used.
    """
    name = key_dir_name(source, cc, flags)
    problems = []
    for where, root_of, follow in _roots():
        try:
            root = _private_dir(Path(os.path.abspath(root_of())))
            _check_private(root, is_dir=True, follow=follow)
            out_dir = _private_dir(root / name)
            _check_chain(out_dir, root, follow)
            lib = out_dir / _lib_name(source)
            failed = out_dir / FAILURE_FILE
            if os.path.lexists(lib):
                _check_private(lib, is_dir=False)
                return lib
            if os.path.lexists(failed):
                _check_private(failed, is_dir=False)
                raise BuildError(
                    f"{failed.read_text().strip()}\n(cached by an earlier process in {failed}: delete that file to "
                    f"retry the build with these flags)"
                )
            return _compile(cc, flags, source, out_dir, lib)
        except UnsafePathError as exc:
            _warn_unsafe(exc)
            problems.append(f"{where}: {exc}")
        except BuildError:
            raise
        except (OSError, RuntimeError, KeyError) as exc:  # unwritable, missing, no home: the same flags elsewhere
            problems.append(f"{where}: {exc}")
    raise RuntimeError("no private directory to build the FAdam CPU kernel in:\n" + "\n".join(problems))


def load(source: Path, loader: Callable[[Path], ctypes.CDLL]) -> tuple[ctypes.CDLL, Path]:
    """Build ``source`` (first flag set that the compiler accepts and that loads) and load it with ``loader``.

    ``loader(path)`` opens the library (``ctypes.CDLL``) and declares its functions; it is called only on a path
    that passed the checks above. Raises ``RuntimeError`` with the reason (the compiler command and its stderr when
    the build failed) when the kernel cannot be had.
    """
    if os.environ.get(DISABLE_ENV_VAR, "") not in ("", "0"):
        raise RuntimeError(f"the FAdam CPU kernel is disabled by {DISABLE_ENV_VAR}")
    cc = compiler()
    if cc is None:
        raise RuntimeError(
            "the FAdam CPU kernel needs a C compiler at first use, and none was found (tried $CC, cc, gcc, clang). "
            "Install one (e.g. `apt-get install gcc`) or use FAdam(foreach=True) on CPU."
        )
    errors = []
    for flags in FLAG_SETS:
        try:
            path = build(source, cc, flags)
        except BuildError as exc:  # these flags are rejected: try the next set
            errors.append(str(exc))
            continue
        try:
            return loader(path), path
        except (OSError, AttributeError, RuntimeError) as exc:  # e.g. the OpenMP runtime is missing at run time
            errors.append(f"loading {path} failed: {exc}")
    raise RuntimeError("could not build the FAdam CPU kernel; the first attempt:\n" + errors[0])


class LazyLibrary:
    """A C kernel library built and loaded at first use, once per process (thread-safe); a failure is remembered.

    Each kernel module holds one: the first :meth:`get` calls :func:`load` under a lock, later calls return the
    loaded library without locking. A failure is kept, so a process that cannot build the kernel tries once (a
    build takes seconds) and every later call raises the same reason at once.
    """

    def __init__(self, source: Path, loader: Callable[[Path], ctypes.CDLL]) -> None:
        self._source = source
        self._loader = loader
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._path: Path | None = None
        self._error: str | None = None

    def get(self) -> ctypes.CDLL:
        """The loaded library, built on first use; raises ``RuntimeError`` with the reason when it cannot be."""
        if self._lib is not None:
            return self._lib
        with self._lock:
            if self._lib is not None:
                return self._lib
            if self._error is not None:
                raise RuntimeError(self._error)
            try:
                self._lib, self._path = load(self._source, self._loader)
            except RuntimeError as exc:
                self._error = str(exc)
                raise
            return self._lib

    def is_available(self) -> bool:
        """True when the library is loaded (or can be built and loaded now); never raises."""
        try:
            self.get()
        except RuntimeError:
            return False
        return True

    def unavailable_reason(self) -> str | None:
        """Why :meth:`is_available` is False (the compiler command and its stderr when the build failed), else None."""
        return None if self.is_available() else self._error

    @property
    def path(self) -> Path | None:
        """The loaded library's path (for diagnostics), or None before the first successful load; never loads."""
        return self._path

    def reset(self) -> None:
        """Forget the library and any failure, as in a new process (tests); the next :meth:`get` loads again."""
        with self._lock:
            self._lib = None
            self._path = None
            self._error = None
