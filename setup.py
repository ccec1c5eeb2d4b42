"""The C extensions (everything else is in pyproject.toml).

Here rather than in pyproject's [tool.setuptools] ext-modules table, which needs
setuptools 74.1: the Debian 12 package builds with its setuptools 66.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra"]  # -Werror: tests/test_c_extensions.py

setup(
    ext_modules=[
        # The shared backend's zero and verify loops (see host_agent/wipe/_pages.c for why C).
        Extension("vmwipe.host_agent.wipe._pages", ["host_agent/wipe/_pages.c"],
                  extra_compile_args=_FLAGS),
        # The scrub's header-hopping walk and listed-page lookup (host_agent/snapshot/_ramwalk.c).
        Extension("vmwipe.host_agent.snapshot._ramwalk", ["host_agent/snapshot/_ramwalk.c"],
                  extra_compile_args=_FLAGS),
    ],
)
