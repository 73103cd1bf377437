"""Build script: setuptools drives CMake to compile the extension ``perturbdiff._C``.

Metadata lives in pyproject.toml. Install with ``pip install --no-build-isolation .`` (or ``-e .``)
so the extension is built against the torch that is already installed.

Environment:
  PERTURBDIFF_FORCE_CUDA=1   compile the CUDA kernels even when torch sees no GPU (CI, containers)
  TORCH_CUDA_ARCH_LIST       CUDA architectures, default "8.0;9.0"
  MAX_JOBS                   parallel compile jobs (default: CPU count)
  CMAKE_BUILD_TYPE           Release (default) or Debug / RelWithDebInfo
  PERTURBDIFF_CMAKE_ARGS     extra arguments for the CMake configure step
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles (setuptools only knows its name)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch  # imported here: only the build needs it, and only the installed one

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        env = dict(os.environ)
        # torch's CMake config reads TORCH_CUDA_ARCH_LIST; without it, it would probe for GPUs.
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPERTURBDIFF_OUTPUT_DIR={target.parent}",
            f"-DPERTURBDIFF_OUTPUT_NAME={target.name}",
            f"-DPERTURBDIFF_TORCH_VERSION={torch.__version__}",
            f"-DPERTURBDIFF_TORCH_HAS_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            f"-DPERTURBDIFF_FORCE_CUDA={'ON' if os.environ.get('PERTURBDIFF_FORCE_CUDA') == '1' else 'OFF'}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("PERTURBDIFF_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, cwd=build_dir, env=env, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config, "--parallel", jobs],
                       cwd=build_dir, env=env, check=True)


def long_description() -> str:
    readme = ROOT / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else ""


setup(
    long_description=long_description(),
    long_description_content_type="text/markdown",
    # The Triton kernels live in the top-level kernels/ folder (DESIGN.md) and ship as perturbdiff.kernels.
    packages=find_packages(include=["perturbdiff", "perturbdiff.*"]) + ["perturbdiff.kernels"],
    package_dir={"perturbdiff.kernels": "kernels"},
    ext_modules=[CMakeExtension("perturbdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
