"""Building benchlib's native sparse kernels (``csrc/``) just in time, once per machine.

Route, and why: the kernels are plain C++ (no torch or pybind headers) compiled by the system
C++ compiler into a shared library that ``ctypes`` loads. That builds in 3-12 s on 2 cores
where a ``torch.utils.cpp_extension`` module (torch/extension.h, pybind11) takes about a minute
and needs ninja; it has no ABI tie to the installed torch; and a ctypes call costs about 2 us,
noise next to a layer. Threads come from ``#pragma omp parallel`` in the library: it links
``libgomp.so.1``, which resolves to the copy torch has already loaded, so the kernels run on
torch's own OpenMP pool and follow ``torch.set_num_threads`` (no second pool spinning).

The library is compiled with ``-O3 -march=native`` (falling back to no ``-march`` where the
compiler refuses it), never ``-ffast-math``: IEEE arithmetic. It is cached in
``$BENCHLIB_CACHE_DIR/extensions``, else ``~/.cache/benchlib/extensions``, under a key over the
source, the flags, the compiler's version and this CPU's features, so a shared home directory
never hands one machine another's build. Concurrent processes serialize on a lock file and the
library is written atomically (a temporary name, then ``os.replace``). ``load_library()``
builds or loads once per process and caches the answer, failure included: a ``NativeLibrary``
or a ``NativeUnavailable`` whose ``reason`` is one line (no compiler, a compile error, ...);
callers then fall back to PyTorch's sparse product and report that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CACHE_ENV = "BENCHLIB_CACHE_DIR"
CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "spmm.cpp", CSRC / "layout.cpp", CSRC / "head.cpp", CSRC / "chain.cpp")
"""Compiled into one library: the sparse products, the conv layout copy and max pooling, the
classifier head (global average pool, dense linear) and the chain runner."""
HEADERS = (CSRC / "common.h",)
"""Included by the sources (the vector type per instruction set, the OpenMP loop)."""
BASE_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")
"""``-fno-math-errno`` only lets the compiler skip errno for math calls; no fast-math."""
ARCH_FLAGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
"""Tried in order, the first the compiler accepts is used: without ``-march=native`` the
kernels fall back to portable C++ (the compiler vectorizes what it can), without OpenMP to
one thread."""
COMPILE_TIMEOUT_S = 300


class NativeUnavailable(Exception):
    """The native kernels cannot be built or loaded here; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class NativeLibrary:
    """The loaded kernels: ``gather``, ``rows``, ``conv_layout`` and ``max_pool2d`` are the
    ``benchlib_``-prefixed functions of ``csrc/*.cpp`` with their argument types set."""

    path: Path
    isa: str
    """Instruction set the kernels were compiled for: ``avx512``, ``avx2`` or ``generic``."""
    build_s: float
    """Seconds spent compiling in this process (0.0 when the cached library was loaded)."""
    gather: Callable[..., int]
    rows: Callable[..., int]
    conv_layout: Callable[..., int]
    max_pool2d: Callable[..., int]
    gather_packed: Callable[[int], int]
    """``gather`` with its arguments packed in one int64 array (its address): see
    ``PackedCall``. Likewise ``rows_packed`` and ``conv_layout_packed``."""
    rows_packed: Callable[[int], int]
    conv_layout_packed: Callable[[int], int]
    run_chain: Callable[[int, int], int]
    """Runs a chain of packed calls (``benchlib.sparse.chain``): steps' address, count."""
    mean_planes_packed: Callable[[int], int]
    """The chain's head steps (``csrc/head.cpp``), packed only: the average pool and the dense
    linear layer."""
    dense_linear_packed: Callable[[int], int]


class PackedCall:
    """One call of a ``*_packed`` function, its arguments in one int64 array: those that stay
    the same (a layer's weights, its geometry) are written once, the others (the activations'
    addresses, the thread count) per call with ``call[index] = value``. ctypes then converts
    one argument, not 13-23 (about 0.3-0.5 us each): a layer call costs a few us, not 10-20.

    The array holds addresses, so the call keeps the tensors behind them alive (``keep``). Not
    for concurrent use: a caller that may run from two threads serializes its calls.
    """

    __slots__ = ("_address", "_array", "_function", "keep")

    def __init__(
        self, function: Callable[[int], int], args: Sequence[int | None], keep: tuple[Any, ...]
    ) -> None:
        self._array = (ctypes.c_int64 * len(args))(*(0 if a is None else int(a) for a in args))
        self._address = ctypes.addressof(self._array)
        self._function = function
        self.keep = keep

    def __setitem__(self, index: int, value: int) -> None:
        self._array[index] = value

    def __getitem__(self, index: int) -> int:
        return int(self._array[index])

    def __call__(self) -> int:
        """Runs the function on the array as it is now; returns its status (0: done)."""
        return self._function(self._address)

    @property
    def address(self) -> int:
        """The argument array's address (what the function receives)."""
        return self._address

    def copy(self) -> PackedCall:
        """The same call on a new array holding the current arguments (and keeping the same
        tensors alive): for a caller that sets arguments of its own."""
        return PackedCall(self._function, list(self._array), self.keep)


def cache_dir(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """``$BENCHLIB_CACHE_DIR/extensions``, else ``~/.cache/benchlib/extensions``."""
    environ = os.environ if environ is None else environ
    configured = environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser() / "extensions"
    return (Path.home() if home is None else home) / ".cache" / "benchlib" / "extensions"


def compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """``$CXX`` if set, else the first of ``c++``, ``g++``, ``clang++`` on the PATH."""
    environ = os.environ if environ is None else environ
    configured = environ.get("CXX", "").strip()
    if configured:
        return shutil.which(configured) or configured
    return next(
        (found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None
    )


def _cpu_features() -> str:
    """This CPU's identity for the cache key: the flags line of /proc/cpuinfo where there is
    one (``-march=native`` compiles for exactly those), else the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
    )


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0][:300]


def _compile(cxx: str, target: Path) -> None:
    """Compile SOURCES into ``target`` (atomically). Raises NativeUnavailable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=".spmm.", suffix=".so")
    os.close(descriptor)
    try:
        output = ""
        sources = [str(source) for source in SOURCES]
        for arch in ARCH_FLAGS:
            result = _run([cxx, *BASE_FLAGS, *arch, *sources, "-o", temporary])
            if result.returncode == 0:
                os.replace(temporary, target)
                return
            output = result.stderr + result.stdout
        raise NativeUnavailable(
            f"{Path(cxx).name} could not compile {' '.join(s.name for s in SOURCES)}: "
            f"{_first_error(output)}"
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"running {cxx} failed: {exc}") from exc
    finally:
        Path(temporary).unlink(missing_ok=True)


SIGNATURES = {
    "benchlib_spmm_gather": "pppp ii p iiiii p ii n p p i n iiiii p i ii",
    "benchlib_spmm_rows": "pppp ii p ii p i n n",
    "benchlib_conv_layout": "p iiii p iiiiiiii p n iiiii",
    "benchlib_max_pool2d": "p iii p iiiiiiiiii n n",
    "benchlib_spmm_gather_packed": "p",
    "benchlib_spmm_rows_packed": "p",
    "benchlib_conv_layout_packed": "p",
    "benchlib_mean_planes_packed": "p",
    "benchlib_dense_linear_packed": "p",
    "benchlib_run_chain": "p i",
}
"""Argument types of the library's functions, as in csrc/*.cpp: p a pointer, i an int64_t,
n an int. All return int (0: done)."""


def _bind(path: Path, build_s: float) -> NativeLibrary:
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {path}: {exc}") from exc
    codes = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "n": ctypes.c_int}
    functions = {}
    for name, signature in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = [codes[code] for code in signature.replace(" ", "")]
        function.restype = ctypes.c_int
        functions[name.removeprefix("benchlib_")] = function
    isa = library.benchlib_spmm_isa
    isa.restype, isa.argtypes = ctypes.c_char_p, []
    return NativeLibrary(
        path,
        isa().decode(),
        build_s,
        functions["spmm_gather"],
        functions["spmm_rows"],
        functions["conv_layout"],
        functions["max_pool2d"],
        functions["spmm_gather_packed"],
        functions["spmm_rows_packed"],
        functions["conv_layout_packed"],
        functions["run_chain"],
        functions["mean_planes_packed"],
        functions["dense_linear_packed"],
    )


def build(directory: Path, cxx: str | None) -> NativeLibrary:
    """The library built for this machine in ``directory`` (compiling it if not cached).

    Raises NativeUnavailable: no compiler, a compile error, a library that will not load.
    """
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")
    try:
        version = _run([cxx, "--version"]).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"cannot run the C++ compiler {cxx!r}: {exc}") from exc
    key_text = "\n".join(
        [
            *(path.read_text() for path in (*SOURCES, *HEADERS)),
            repr(BASE_FLAGS),
            repr(ARCH_FLAGS),
            *version,
            _cpu_features(),
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    target = directory / f"benchlib_spmm_{key}.so"
    start = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f".benchlib_spmm_{key}.lock", "w") as lock:
            _exclusive(lock)
            built = not target.exists()
            if built:
                _compile(cxx, target)
    except OSError as exc:
        raise NativeUnavailable(f"cannot write the kernel cache {directory}: {exc}") from exc
    return _bind(target, time.perf_counter() - start if built else 0.0)


def _exclusive(handle: IO[str]) -> None:
    """Hold an exclusive lock on the open file until it is closed (POSIX; elsewhere a no-op,
    the atomic replace then keeps concurrent builders safe, only duplicated)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


@functools.cache
def load_library() -> NativeLibrary | NativeUnavailable:
    """The native kernels for this process: built or loaded on the first call, then cached
    (a failure too, so a missing compiler is tried once). Never raises."""
    try:
        return build(cache_dir(), compiler())
    except NativeUnavailable as exc:
        return exc
