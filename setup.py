"""Build hook for the optional compiled parts of hif4fmt: the HiF4 encoder kernel (hif4fmt/codec/_kernel.c) and
the calibration sketch update (hif4fmt/calibration/_sketch_kernel.c).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and ``hif4fmt.hifloat4`` uses its torch paths, which give the same bytes
(``python -m hif4fmt.codec.kernel`` and ``hif4fmt codec`` say which one runs; tools/bootstrap.sh warns
when the kernel did not build). Compiled without fast-math and without floating-point contraction, so
every float32 operation rounds as the spec and the torch paths do. The sketch kernel is optional in the
same way: without it ``hif4fmt.calibration.sketch`` uses its torch path, which gives the same counts
(``python -m hif4fmt.calibration.sketch_kernel`` says which one runs).
"""

from setuptools import Extension, setup

KERNEL_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-pthread"]

setup(ext_modules=[Extension("hif4fmt.codec._kernel", ["hif4fmt/codec/_kernel.c"],
                             depends=["hif4fmt/codec/_gemm.c", "hif4fmt/codec/_avx512_emulation.h"], extra_compile_args=KERNEL_FLAGS,
                             extra_link_args=["-pthread"],
                             optional=True),
                   Extension("hif4fmt.calibration._sketch_kernel", ["hif4fmt/calibration/_sketch_kernel.c"],
                             extra_compile_args=KERNEL_FLAGS, extra_link_args=["-pthread"], optional=True)])
