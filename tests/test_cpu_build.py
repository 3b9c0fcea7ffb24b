"""The C kernel's build cache (hf_fadam.kernels._cpu_build): private paths only, flags kept, failures cached.

Loading a shared library runs its constructors in this process, so each test that plants a library gives it a
constructor that writes a marker file, and asserts that the marker never appears. Every test runs as a new process
would (nothing loaded yet), with the cache and the temp dir under ``tmp_path``. The compiler is a stand-in that
logs each build and copies the kernel this session already built (compiling the real kernel takes seconds), and
leaves its output with mode 0777, as a linker under a permissive umask may. The last test checks the per-process
holder of the library (:class:`~hf_fadam.kernels._cpu_build.LazyLibrary`) with a stand-in loader, without a compiler.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest

from hf_fadam.kernels import _cpu_build, cpu_fused


REAL_CC = _cpu_build.compiler()

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
int hf_fadam_abi_version(void) { return 1; }
"""


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """The kernel this session built; every build-cache test needs it (so POSIX and a C compiler)."""
    if not hasattr(os, "getuid") or REAL_CC is None:
        pytest.skip("POSIX with a C compiler only")
    if not cpu_fused.is_available():
        pytest.skip(f"the CPU kernel does not build here: {cpu_fused.unavailable_reason()}")
    copy = tmp_path_factory.mktemp("prebuilt") / "kernel.so"
    copy.write_bytes(cpu_fused.library_path().read_bytes())
    return copy


def _compiler(tmp_path: Path, prebuilt: Path, reject: str | None = None, reject_all: bool = False) -> Path:
    """A compiler that logs each build, rejects builds with the flag ``reject`` (or all), else "builds" the kernel."""
    log = tmp_path / "builds.log"
    fake = tmp_path / "cc"
    real = REAL_CC
    rejected = (
        "true"
        if reject_all
        else "false"
        if reject is None
        else f'case " $* " in *" {reject} "*) true;; *) false;; esac'
    )
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then exec "{real}" --version; fi\n'
        f'echo "$*" >> "{log}"\n'
        f'if {rejected}; then echo "cc: error: unrecognized command-line option" >&2; exit 1; fi\n'
        'out=""; prev=""; for a in "$@"; do [ "$prev" = -o ] && out="$a"; prev="$a"; done\n'
        f'rm -f "$out" && cp "{prebuilt}" "$out" && chmod 0777 "$out"\n'
    )
    fake.chmod(0o755)
    return fake


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def fresh(monkeypatch, tmp_path, prebuilt):
    """A process that has not loaded the kernel yet; cache in tmp_path/cache, system temp dir tmp_path/tmp."""
    _new_process(monkeypatch)
    monkeypatch.setattr(_cpu_build, "_process_dir", None, raising=False)
    (tmp_path / "tmp").mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("HF_FADAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_FADAM_CPU_FUSED_BACKEND", "c")
    monkeypatch.delenv("HF_FADAM_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setenv("CC", str(_compiler(tmp_path, prebuilt)))
    return tmp_path


def _new_process(monkeypatch):
    """Give cpu_fused a holder with nothing loaded and no failure, as in a new process (the old one is restored)."""
    monkeypatch.setattr(cpu_fused, "_library", _cpu_build.LazyLibrary(cpu_fused._SOURCE, cpu_fused._load_lib))


def _key_dir(root: Path, flags_index: int = 0) -> Path:
    return root / _cpu_build.key_dir_name(
        cpu_fused._SOURCE, _cpu_build.compiler(), list(_cpu_build.FLAG_SETS[flags_index])
    )


def _plant(key_dir: Path, marker: Path, dir_mode: int = 0o700, file_mode: int = 0o700) -> Path:
    """What another user could leave where the kernel is looked for: a library whose constructor runs code."""
    key_dir.mkdir(parents=True, exist_ok=True)
    src = key_dir.parent / "planted.c"
    src.write_text(PLANTED_C)
    lib = key_dir / "libhf_fadam_cpu.so"
    cmd = [REAL_CC, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True)
    src.unlink()
    lib.chmod(file_mode)
    key_dir.chmod(dir_mode)
    return lib


def _load(marker: Path) -> str:
    """Load the kernel as a new process would; check that no planted code ran; return the warnings' text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = cpu_fused.is_available()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert available, cpu_fused.unavailable_reason()
    return "\n".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_planted_library_in_group_writable_cache_dir_is_not_loaded(fresh):
    marker = fresh / "marker"
    planted = _plant(_key_dir(fresh / "cache"), marker, dir_mode=0o775)
    warned = _load(marker)
    assert re.search(r"cpu_kernel-\w+ is writable by group or others \(mode 0o775\)", warned), warned
    loaded = cpu_fused.library_path()
    assert loaded != planted and (fresh / "tmp") in loaded.parents  # rebuilt in the private temp fallback


def test_group_writable_library_file_is_not_loaded(fresh):
    marker = fresh / "marker"
    (fresh / "cache").mkdir(mode=0o700)
    planted = _plant(_key_dir(fresh / "cache"), marker, file_mode=0o775)
    warned = _load(marker)
    assert re.search(r"the file .*libhf_fadam_cpu\.so is writable by group or others", warned), warned
    assert cpu_fused.library_path() != planted


@pytest.mark.parametrize("attack", ["world-writable", "other-owner"])
def test_planted_library_in_shared_temp_dir_is_not_loaded(fresh, attack):
    """The cache is unusable, so the build falls back to $TMPDIR/hf_fadam-<uid>, which another user made first."""
    if attack == "other-owner" and os.geteuid() != 0:
        pytest.skip("making a directory owned by another user needs root")
    (fresh / "not-a-dir").write_text("")
    os.environ["HF_FADAM_CACHE_DIR"] = str(fresh / "not-a-dir")  # restored by the fixture's monkeypatch
    marker = fresh / "marker"
    shared = fresh / "tmp" / f"hf_fadam-{os.getuid()}"
    _plant(_key_dir(shared), marker, dir_mode=0o755, file_mode=0o755)
    if attack == "world-writable":
        shared.chmod(0o777)
        message = r"hf_fadam-\d+ is writable by group or others \(mode 0o777\)"
    else:
        for path in (shared, *shared.rglob("*")):
            os.chown(path, 65534, 65534)
        message = r"hf_fadam-\d+ belongs to uid 65534, not to this user"
    warned = _load(marker)
    assert re.search(message, warned), warned
    loaded = cpu_fused.library_path()
    assert shared not in loaded.parents
    assert _mode(loaded.parents[1]) == 0o700  # a mkdtemp-style directory of this process


def test_directories_and_library_are_private_under_a_permissive_umask(fresh):
    old = os.umask(0o002)
    try:
        assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    finally:
        os.umask(old)
    lib = cpu_fused.library_path()
    assert lib.parents[1] == fresh / "cache" and len(_builds(fresh)) == 1
    assert _mode(fresh / "cache") == 0o700 and _mode(lib.parent) == 0o700
    assert _mode(lib) & 0o077 == 0


def test_read_only_cache_dir_keeps_the_native_flags(fresh, monkeypatch):
    """A key dir that cannot be written moves the same build elsewhere; it must not downgrade the flags."""
    cache = fresh / "cache"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # as on a read-only file system (chmod does not stop root)
        if dir is not None and cache in Path(dir).parents:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    lib = cpu_fused.library_path()
    assert lib.parent.name == _key_dir(cache).name, "built with other flags than the first set"
    assert (fresh / "tmp") in lib.parents


def test_failed_build_is_cached_and_leaves_no_empty_directories(fresh, monkeypatch, prebuilt):
    monkeypatch.setenv("CC", str(_compiler(fresh, prebuilt, reject_all=True)))
    assert not cpu_fused.is_available()
    assert "unrecognized command-line option" in cpu_fused.unavailable_reason()
    builds = _builds(fresh)
    assert len(builds) == len(_cpu_build.FLAG_SETS)
    key_dirs = [d for d in (fresh / "cache").iterdir() if d.name.startswith("cpu_kernel-")]
    assert len(key_dirs) == len(_cpu_build.FLAG_SETS)
    assert all(any(d.iterdir()) for d in key_dirs), "a failed build left an empty directory"

    _new_process(monkeypatch)
    assert not cpu_fused.is_available()
    assert _builds(fresh) == builds, "a new process compiled the rejected flag sets again"
    reason = cpu_fused.unavailable_reason()
    assert "unrecognized command-line option" in reason and "cached" in reason


def test_only_a_rejected_flag_moves_to_the_next_flag_set(fresh, monkeypatch, prebuilt):
    monkeypatch.setenv("CC", str(_compiler(fresh, prebuilt, reject="-march=native")))
    assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    assert cpu_fused.library_path().parent.name == _key_dir(fresh / "cache", 1).name
    builds = _builds(fresh)
    assert len(builds) == 2 and "-march=native" in builds[0] and "-march=native" not in builds[1]

    _new_process(monkeypatch)
    assert cpu_fused.is_available()
    assert _builds(fresh) == builds  # the rejection and the build are both cached


def test_cache_key_covers_the_base_and_link_flags(monkeypatch):
    """The key hashes the whole compile command: a change of BASE_FLAGS or LINK_FLAGS alone (as a release that only
    retunes them) gives another cache directory; the same inputs give the same one (no compiler is run but --version).
    """
    source, cc, flags = cpu_fused._SOURCE, REAL_CC or "cc", list(_cpu_build.FLAG_SETS[0])
    key = _cpu_build.key_dir_name(source, cc, flags)
    assert re.fullmatch(r"cpu_kernel-[0-9a-f]{16}", key)
    assert _cpu_build.key_dir_name(source, cc, list(flags)) == key
    base = list(_cpu_build.BASE_FLAGS)
    keys = {key}
    for changed in (
        [("-O2" if f == "-O3" else f) for f in base],
        [*base, "-fno-strict-aliasing"],
        [f for f in base if f != "-ffp-contract=off"],
    ):
        monkeypatch.setattr(_cpu_build, "BASE_FLAGS", changed)
        keys.add(_cpu_build.key_dir_name(source, cc, flags))
        assert _cpu_build.key_dir_name(source, cc, flags) in keys  # deterministic under the new flags too
    assert len(keys) == 4, "a change of the base flags alone kept the key"
    monkeypatch.setattr(_cpu_build, "BASE_FLAGS", base)
    assert _cpu_build.key_dir_name(source, cc, flags) == key
    monkeypatch.setattr(_cpu_build, "LINK_FLAGS", [*getattr(_cpu_build, "LINK_FLAGS", []), "-lpthread"], raising=False)
    assert _cpu_build.key_dir_name(source, cc, flags) not in keys, "a change of the link flags alone kept the key"
    monkeypatch.undo()
    assert _cpu_build.key_dir_name(source, cc, flags) == key


def test_changed_base_flags_build_again_instead_of_loading_the_cached_library(fresh, monkeypatch):
    assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    first = cpu_fused.library_path()
    assert len(_builds(fresh)) == 1
    monkeypatch.setattr(_cpu_build, "BASE_FLAGS", [*_cpu_build.BASE_FLAGS, "-fno-strict-aliasing"])
    _new_process(monkeypatch)
    assert cpu_fused.is_available(), cpu_fused.unavailable_reason()
    builds = _builds(fresh)
    assert len(builds) == 2, "the library built with the old base flags was loaded"
    assert "-fno-strict-aliasing" in builds[1].split() and "-fno-strict-aliasing" not in builds[0].split()
    assert cpu_fused.library_path().parent != first.parent


def test_lazy_library_tries_once_remembers_a_failure_and_caches_the_library(monkeypatch, tmp_path):
    """The holder itself, with a stand-in loader (the build is a stub here: no compiler is run)."""
    source = tmp_path / "kernel.c"
    built = tmp_path / "libkernel.so"
    monkeypatch.setattr(_cpu_build, "load", lambda src, loader: (loader(built), built))
    calls = []
    fail = True
    lib = object()

    def loader(path):
        calls.append(path)
        if fail:
            raise RuntimeError("no kernel today")
        return lib

    holder = _cpu_build.LazyLibrary(source, loader)
    assert holder.path is None and not calls  # nothing is built before first use
    assert not holder.is_available()
    assert holder.unavailable_reason() == "no kernel today"
    with pytest.raises(RuntimeError, match="no kernel today"):
        holder.get()
    assert calls == [built] and holder.path is None  # the failure is remembered: one attempt

    fail = False
    assert not holder.is_available(), "a remembered failure must not be retried without reset()"
    holder.reset()
    assert holder.get() is lib and holder.path == built
    assert holder.is_available() and holder.unavailable_reason() is None
    assert holder.get() is lib and len(calls) == 2  # cached: the loader ran once more, after reset(), only
    holder.reset()
    assert holder.path is None
