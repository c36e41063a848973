"""Build the Cython hot paths. FASTKNOCK_NO_EXTENSIONS=1 skips them (pure Python only);
FASTKNOCK_CYTHON_TRACE=1 builds with line tracing for coverage/profiling (``make debug``).

``_wire`` and ``_hmac`` (shared by client and server) build everywhere; ``knockd._recv`` and
``knockd._decide`` (recvmmsg, fastknockd only) need Linux and are built only there. Without an extension the
pure-Python reference beside it is used, so the client installs and runs on any platform:
outside Linux a failed compile (no compiler) is a warning, not an error. On Linux it is an
error (and tests/test_extensions.py fails if an extension silently fell back).
"""

import os
import sys

from setuptools import Extension, setup

ext_modules = []
# The switch fastknock._ext reads at run time, read here directly: setup.py runs before the
# package is built and cannot import it.
if os.environ.get("FASTKNOCK_NO_EXTENSIONS") != "1":
    from Cython.Build import cythonize

    trace = os.environ.get("FASTKNOCK_CYTHON_TRACE") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    cflags = ["-O3", "-fno-strict-aliasing"] if sys.platform != "win32" else []
    linux = sys.platform.startswith("linux")
    sources = {"fastknock._wire": "fastknock/_wire.pyx", "fastknock._hmac": "fastknock/_hmac.pyx"}
    if linux:
        sources["fastknock.knockd._decide"] = "fastknock/knockd/_decide.pyx"
        sources["fastknock.knockd._recv"] = "fastknock/knockd/_recv.pyx"
    ext_modules = cythonize(
        [
            Extension(
                name,
                [source],
                include_dirs=["fastknock"],
                define_macros=macros,
                extra_compile_args=cflags,
            )
            for name, source in sources.items()
        ],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": trace,
        },
    )
    for ext in ext_modules:  # set here: cythonize() does not carry ``optional`` over
        ext.optional = not linux

setup(ext_modules=ext_modules)
