"""Build the cpkernels C++ (and, where possible, CUDA) extension `cpkernels._C`.

Switches (environment variables):
  CPKERNELS_NO_EXT=1   build no extension at all (pure Python install: reference and Triton only)
  CPKERNELS_NO_CUDA=1  build the CPU kernels only, even where CUDA could be built (a dev build in
                       seconds instead of minutes; the cuda backend then reports itself missing)
  FORCE_CUDA=1         build the CUDA sources even when torch or the toolkit look CPU-only
  TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100 and H100/H200) when unset, since a
                       machine without a GPU has nothing to detect.

Install with `pip install --no-build-isolation .` so the extension is compiled against
the torch that will load it; see the README for why.
"""
import glob
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def _find_cuda_home():
    """Return a CUDA toolkit root that holds bin/nvcc, or None.

    torch's own guess walks up from `which nvcc`; with nvcc linked into /usr/local/bin that
    gives /usr/local, which has no CUDA headers. So we check the usual places first.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return c
    return None


def _pip_cuda_include_dirs():
    """Headers that pip's nvidia-* wheels ship (cusparse.h, cublas_v2.h, ...).

    torch's CUDA headers include them, but a system toolkit may lack them (seen with the
    CUDA 13 toolkit here: cusparse.h lives only in site-packages/nvidia/cu13/include).
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += glob.glob(os.path.join(base, "cu1*", "include"))
        dirs += glob.glob(os.path.join(base, "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extensions():
    if _truthy("CPKERNELS_NO_EXT"):
        print("cpkernels: CPKERNELS_NO_EXT is set, building no extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    with_cuda = not _truthy("CPKERNELS_NO_CUDA") and (
        _truthy("FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None))
    sources = ["csrc/ops.cpp", "csrc/host.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++20 from torch 2.13)
    link_flags = ["-fopenmp"]
    define_macros = []
    if with_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"cpkernels: building CPU + CUDA extension (CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"arch={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            "cpkernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs(),
            define_macros=define_macros + [("CPKERNELS_WITH_CUDA", None)],
            # No --use_fast_math: the custom kernels are memory-bound gathers and sums, and
            # flushing denormals would only cost accuracy.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        reason = "no CUDA sources" if not cuda_sources else "CPKERNELS_NO_CUDA is set" if _truthy(
            "CPKERNELS_NO_CUDA") else (
            "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found")
        print(f"cpkernels: building the CPU extension only ({reason})")
        ext = cpp_extension.CppExtension(
            "cpkernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                          or importlib.util.find_spec("ninja") is not None)
    return [ext], {"build_ext": build_ext}


class BuildPyWithCommit(build_py):
    """Also write cpkernels/_commit.txt into the built package: the source commit, so an installed copy
    (no git next to it) can still name it in results files (cpkernels._buildinfo.source_commit)."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("_buildinfo", os.path.join(ROOT, "cpkernels", "_buildinfo.py"))
        info = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(info)
        commit = info.git_commit(ROOT)
        if commit:
            with open(os.path.join(self.build_lib, "cpkernels", info.COMMIT_FILE), "w") as f:
                f.write(commit + "\n")


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithCommit})
