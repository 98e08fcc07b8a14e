"""Build of racedit._C: the C11 core, the CPython/NumPy binding and, when nvcc is found,
the CUDA kernels. Optional features are probed and fall back cleanly; what was found is
printed and written to racedit/_build_info.py.

Environment knobs:
  RACEDIT_NO_CUDA=1     do not compile CUDA even if nvcc is found
  RACEDIT_NO_NCCL=1     do not use NCCL (multi-GPU data parallel) even if it is found
  RACEDIT_NO_OPENMP=1   do not use OpenMP
  RACEDIT_PORTABLE=1    no -march=native (for wheels meant for other machines)
  RACEDIT_DEBUG=1       -O0 -g (with RACEDIT_ASAN=1: AddressSanitizer, with
                        RACEDIT_UBSAN=1: UndefinedBehaviorSanitizer, any report fatal)
  CUDA_HOME             where to look for nvcc first

Rebuilds are honest: everything that decides what the objects contain (flags, macros, the
nvcc and cuBLAS found, the interpreter and NumPy) is hashed into a build id. When it differs
from the id of the objects in the build folder, every source is compiled again (setuptools
alone would relink stale objects). The id is compiled into racedit._C and written to
racedit/_build_info.py, and `import racedit` refuses a pair that disagrees.

The built extension is also copied into the source folder's racedit/ (as `build_ext
--inplace` does), so that `python -m racedit` and `import racedit` work from the project root,
where Python finds that folder before the installed package.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ["80", "90"]


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


def try_compile(cc, flags, code="int main(void){return 0;}\n", link=True):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write(code)
        cmd = [cc, src, "-o", os.path.join(d, "t.out" if link else "t.o")] + flags
        if not link:
            cmd.insert(1, "-c")
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def find_nvcc():
    if env_flag("RACEDIT_NO_CUDA"):
        return None, "disabled by RACEDIT_NO_CUDA"
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    w = shutil.which("nvcc")
    if w:
        cands.append(w)
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c), "found"
    return None, "nvcc not found"


def nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        return int(out.split("release ")[1].split(".")[0])
    except Exception:
        return None


def site_dirs():
    """Where pip may have put the nvidia-cublas wheel: this interpreter's path, and (to see
    through pip's build isolation, which hides the environment's site-packages) the path
    of the same interpreter started without the isolation's variables."""
    dirs = [d for d in sys.path if d and os.path.isdir(d)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", "import sys; print(chr(10).join(sys.path))"],
                             capture_output=True, text=True, env=env, timeout=60).stdout
        dirs += [d for d in out.splitlines() if d and os.path.isdir(d)]
    except Exception:
        pass
    seen, uniq = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            uniq.append(d)
    return uniq


def cublas_lib(libdir, name="cublas"):
    """The file to link: lib<name>.so, else the highest versioned lib<name>.so.N (wheels
    carry no unversioned symlink)."""
    if os.path.exists(os.path.join(libdir, f"lib{name}.so")):
        return f"lib{name}.so"
    libs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(libdir, f"lib{name}.so.*")))
    return libs[-1] if libs else None


def find_nccl(cuda_home, major):
    """NCCL headers + library, looked for as cuBLAS is: the toolkit's, the system's, else
    the nvidia-nccl-cu<major> wheel (nvidia/nccl/). Returns (include_dir, lib_dir, lib_file)
    or Nones; racedit builds without NCCL then (data parallel on GPUs needs it)."""
    if env_flag("RACEDIT_NO_NCCL"):
        return None, None, None
    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    pairs = [(os.path.join(cuda_home, "include"), os.path.join(cuda_home, d)) for d in ("lib64", "lib")]
    pairs.append(("/usr/include", os.path.join("/usr/lib", arch)))
    pairs += [(os.path.join(d, sub, "include"), os.path.join(d, sub, "lib")) for sub in
              ("nvidia/nccl", f"nvidia/cu{major}") for d in site_dirs()]
    for inc, libdir in pairs:
        lib = cublas_lib(libdir, "nccl") if os.path.isdir(libdir) else None
        if lib and os.path.isfile(os.path.join(inc, "nccl.h")):
            return inc, libdir, lib
    return None, None, None


def find_cublas(cuda_home, major):
    """cuBLAS headers + library: the toolkit's own, else the nvidia-cublas wheel (layout
    nvidia/cu13/ for CUDA 13, nvidia/cublas/ for CUDA 12), preferring the wheel that
    matches nvcc's major version. Returns (include_dir, lib_dir, lib_file) or Nones."""
    inc = os.path.join(cuda_home, "include")
    for libdir in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")):
        lib = cublas_lib(libdir) if os.path.isdir(libdir) else None
        if lib and os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            return inc, libdir, lib
    subs = [f"nvidia/cu{major}"] if major else []
    subs += ["nvidia/cublas"] if major in (None, 12) else []
    subs += ["nvidia/cu13", "nvidia/cublas", "nvidia/cu12"]
    for sub in dict.fromkeys(subs):
        for d in site_dirs():
            base = os.path.join(d, sub)
            lib = cublas_lib(os.path.join(base, "lib")) if os.path.isdir(os.path.join(base, "lib")) else None
            if lib and os.path.isfile(os.path.join(base, "include", "cublas_v2.h")):
                return os.path.join(base, "include"), os.path.join(base, "lib"), lib
    return None, None, None


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[0]
        ext = self.extensions[0]
        info = {"openmp": False, "cuda": False, "cublas": False, "native": False, "compiler": cc}
        cflags = ["-std=c11", "-Wall", "-Wno-unknown-pragmas"]
        ldflags = []
        if env_flag("RACEDIT_DEBUG"):
            cflags += ["-O0", "-g"]
            if env_flag("RACEDIT_ASAN"):
                cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
                ldflags += ["-fsanitize=address"]
            if env_flag("RACEDIT_UBSAN"):
                cflags += ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
                ldflags += ["-fsanitize=undefined"]
        else:
            cflags += ["-O3"]
            if not env_flag("RACEDIT_PORTABLE") and try_compile(cc, ["-march=native"], link=False):
                cflags.append("-march=native")
                info["native"] = True
        omp_code = "#include <omp.h>\nint main(void){\n#pragma omp parallel\n{}\nreturn omp_get_max_threads()<0;}\n"
        if not env_flag("RACEDIT_NO_OPENMP") and try_compile(cc, ["-fopenmp"], omp_code):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
            info["openmp"] = True
        nvcc, why = find_nvcc()
        cublas = (None, None, None)
        if nvcc:
            cuda_home = os.path.dirname(os.path.dirname(nvcc))
            cublas = find_cublas(cuda_home, nvcc_major(nvcc))
            if cublas[0] is None:
                why = (f"nvcc found ({nvcc}) but cuBLAS not found (neither in {cuda_home}/lib64 "
                       "nor an nvidia-cublas wheel: pip install nvidia-cublas)")
                print("racedit build: WARNING: " + why + "; building WITHOUT CUDA", flush=True)
                nvcc = None
        if nvcc:
            cub_inc, cub_dir, cub_lib = cublas
            nccl_inc, nccl_dir, nccl_lib = find_nccl(cuda_home, nvcc_major(nvcc))
            nccl_flags = ["-DRD_HAVE_NCCL", "-I" + nccl_inc] if nccl_inc else []
            objs = self.compile_cuda(nvcc, cuda_home, ext, cub_inc, nccl_flags)
            ext.extra_objects += objs
            ext.define_macros.append(("RD_HAVE_CUDA", "1"))
            ext.library_dirs.append(os.path.join(cuda_home, "lib64"))
            ext.libraries += ["cudart_static", "stdc++", "rt", "dl", "pthread"]
            ldflags += ["-L" + cub_dir, "-l:" + cub_lib, "-Wl,-rpath," + cub_dir]
            info["cuda"] = True
            info["cublas"] = os.path.join(cub_dir, cub_lib)
            info["cuda_home"] = cuda_home
            info["cuda_archs"] = CUDA_ARCHS
            info["nccl"] = os.path.join(nccl_dir, nccl_lib) if nccl_inc else False
            if nccl_inc:
                ext.define_macros.append(("RD_HAVE_NCCL", "1"))
                ldflags += ["-L" + nccl_dir, "-l:" + nccl_lib, "-Wl,-rpath," + nccl_dir]
        else:
            info["cuda_reason"] = why
        ext.extra_compile_args += cflags
        ext.extra_link_args += ldflags
        info["build_id"] = self.check_build_id(ext, info)
        ext.define_macros.append(("RD_BUILD_ID", '"%s"' % info["build_id"]))
        print("racedit build: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        super().build_extensions()
        text = '"""Generated by setup.py: what racedit._C was built with."""\n' + f"BUILD_INFO = {info!r}\n"
        targets = [os.path.join(HERE, "racedit")]
        if not self.inplace:
            targets.append(os.path.join(self.build_lib, "racedit"))
        for d in targets:
            os.makedirs(d, exist_ok=True)
            write_atomic(os.path.join(d, "_build_info.py"), text.encode())
        if not self.inplace:
            self.copy_into_source(ext)

    def check_build_id(self, ext, info):
        """The hash of everything that decides what the objects contain; when the build
        folder's objects were made with another, force a full rebuild."""
        config = {"info": info, "cflags": ext.extra_compile_args, "ldflags": ext.extra_link_args,
                  "macros": ext.define_macros, "libraries": ext.libraries,
                  "library_dirs": ext.library_dirs, "objects": ext.extra_objects,
                  "compiler": self.compiler.compiler_so, "python": sys.version,
                  "numpy": np.__version__}
        build_id = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = os.path.join(self.build_temp, "racedit-build-id")
        try:
            with open(stamp) as f:
                old = f.read().strip()
        except OSError:
            old = None
        if old != build_id:
            if old is not None:
                print(f"racedit build: configuration changed ({old} -> {build_id}): "
                      "compiling every source again", flush=True)
            self.force = True
            os.makedirs(self.build_temp, exist_ok=True)
            write_atomic(stamp, build_id.encode())
        return build_id

    def copy_into_source(self, ext):
        """Put the built extension into the source folder's racedit/ too (see the module
        docstring); a read-only source folder (an unpacked sdist, say) is left alone."""
        built = self.get_ext_fullpath(ext.name)
        dest = os.path.join(HERE, "racedit", os.path.basename(built))
        try:
            with open(built, "rb") as f:
                write_atomic(dest, f.read(), mode=0o755)
        except OSError as e:
            print(f"racedit build: note: could not copy {built} into {dest} ({e}); "
                  "`python -m racedit` then works from any folder but the project root",
                  flush=True)

    def compile_cuda(self, nvcc, cuda_home, ext, cublas_inc, extra=()):
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        objs = []
        gencode = []
        for a in CUDA_ARCHS:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        for src in sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu"))):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-Wall",
                   "-I" + os.path.join(HERE, "csrc"), "-I" + cublas_inc, *extra] + ext_include(ext) + gencode
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objs.append(obj)
        return objs


def write_atomic(path, data, mode=0o644):
    """Write ``data`` to ``path`` through a temporary file and a rename, so that a process
    that has the old file open or mapped keeps a whole one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, mode & ~umask)
    os.replace(tmp, path)


def ext_include(ext):
    return ["-I" + d for d in ext.include_dirs]


sources = (sorted(glob.glob("csrc/cpu/*.c")) + sorted(glob.glob("csrc/core/*.c"))
           + sorted(glob.glob("csrc/binding/*.c")))
ext = Extension(
    "racedit._C",
    sources=sources,
    include_dirs=[np.get_include(), "csrc"],
    depends=(glob.glob("csrc/*.h") + glob.glob("csrc/core/*.h") + glob.glob("csrc/binding/*.h")
             + glob.glob("cuda/*.cu*")),
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
