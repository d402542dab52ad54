"""Build hook: generates the gRPC modules into the wheel (pyproject.toml holds the metadata).

`build_py` copies src/mip_client as usual, then runs generate.py's `generate_stubs` into the
build directory. That directory and the egg-info are a fresh temporary directory per build:
generated code never lands in the checkout, and a module generated from a proto that has
since been removed cannot linger into the next wheel. `sdist` carries a copy of the
repository's proto/, so a wheel built from the sdist generates the same modules.
"""

import atexit
import pathlib
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generate  # noqa: E402


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            raise SystemExit(
                "editable installs are not supported: the gRPC modules are generated into "
                "the build, not the checkout; use `pip install ./clients/python`"
            )
        written = generate.generate_stubs(pathlib.Path(self.build_lib) / generate.PACKAGE)
        self.announce(f"generated {len(written)} files from {generate.proto_root()}", level=2)


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        shutil.copytree(generate.proto_root(), pathlib.Path(base_dir) / "proto",
                        dirs_exist_ok=True)


SCRATCH = tempfile.mkdtemp(prefix="mip-client-build-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)

setup(
    cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos},
    options={"build": {"build_base": SCRATCH}, "egg_info": {"egg_base": SCRATCH}},
)
