#!/usr/bin/env python3
"""Tests of scripts/kernel_audit.py on hand-made ptxas reports, PTX and sources (Python 3 standard
library and c++filt; no nvcc, no GPU): a clean audit passes and prints its table; each check fails
on what it is meant to catch (a spill, a spill above its allowlist ceiling, a kernel without
__launch_bounds__ in the source or the PTX, registers x threads over the register file, static
shared memory over 48 KB, a vector instantiation without 16-byte loads or stores, an unclassified
kernel, a ptxas report that does not match the PTX).

  python3 scripts/test_kernel_audit.py [-v]
"""
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("kernel_audit", os.path.join(HERE, "kernel_audit.py"))
ka = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ka)

# Relocatable-device-code names as nvcc writes them (internal linkage: the __nv_static_ prefix).
PRE = "__nv_static_10__abcdefghi_"
VEC = PRE + "_ZN8dropfuse12_GLOBAL__N_114dropout_kernelIfLb1EEEvPKT_"  # dropout_kernel<float, true>
SCALAR = PRE + "_ZN8dropfuse12_GLOBAL__N_114dropout_kernelIfLb0EEEvPKT_"  # dropout_kernel<float, false>
MASK = PRE + "_ZN8dropfuse12_GLOBAL__N_111mask_kernelEPj"  # mask_kernel (NO_VECTOR)
NEW = PRE + "_ZN8dropfuse12_GLOBAL__N_110new_kernelEPj"  # in neither list

SOURCE = """// dropout
template <typename T, bool VEC>
__global__ void __launch_bounds__(256) dropout_kernel(const T *x) {}
#define BOUNDS __launch_bounds__(128, 4)
__global__ void BOUNDS
    mask_kernel(unsigned *m) {}
"""


def kernel(name, regs=40, st=0, ld=0, stack=0, smem=0, maxntid=256, ld16=True, st16=True):
    return dict(name=name, regs=regs, st=st, ld=ld, stack=stack, smem=smem, maxntid=maxntid, ld16=ld16, st16=st16)


def write_fixture(root, kernels, arch="sm_90", source=SOURCE, ptxas_missing=()):
    """root/kernels/dropout.cu and root/work/{dropout.log, dropout/dropout.ptx} for `kernels`."""
    src, work = os.path.join(root, "kernels"), os.path.join(root, "work")
    os.makedirs(src)
    os.makedirs(os.path.join(work, "dropout"))
    with open(os.path.join(src, "dropout.cu"), "w") as f:
        f.write(source)
    log = ["ptxas info    : 0 bytes gmem"]
    ptx = ["//", ".version 9.0", f".target {arch}", ".address_size 64", ""]
    for k in kernels:
        n = k["name"]
        if n not in ptxas_missing:
            log += [f"ptxas info    : Compiling entry function '{n}' for '{arch}'",
                    f"ptxas info    : Function properties for {n}",
                    f"    {k['stack']} bytes stack frame, {k['st']} bytes spill stores, {k['ld']} bytes spill loads",
                    f"ptxas info    : Used {k['regs']} registers, used 0 barriers"
                    + (f", {k['smem']} bytes smem" if k["smem"] else "") + ", 544 bytes cmem[0]",
                    "ptxas info    : Compile time = 1.0 ms"]
        ptx += [f".entry {n}(", f"\t.param .u64 {n}_param_0", ")"]
        if k["maxntid"]:
            ptx.append(f".maxntid {k['maxntid']}, 1, 1")
        ptx.append("{")
        ptx.append("\tld.global.nc.v4.u32 \t{%r1, %r2, %r3, %r4}, [%rd1];" if k["ld16"] else "\tld.global.u16 \t%rs1, [%rd1];")
        ptx.append("\tst.global.v4.u32 \t[%rd2], {%r1, %r2, %r3, %r4};" if k["st16"] else "\tst.global.v4.u16 \t[%rd2], {%rs1, %rs1, %rs1, %rs1};")
        ptx += ["\tret;", "}", ""]
    with open(os.path.join(work, "dropout.log"), "w") as f:
        f.write("\n".join(log) + "\n")
    with open(os.path.join(work, "dropout", "dropout.ptx"), "w") as f:
        f.write("\n".join(ptx))
    return work, src


@unittest.skipUnless(shutil.which("c++filt"), "c++filt (binutils) not found")
class Audit(unittest.TestCase):
    def run_audit(self, kernels, archs="sm_90", **kw):
        with tempfile.TemporaryDirectory() as root:
            work, src = write_fixture(root, kernels, **kw)
            out = io.StringIO()
            fails = ka.audit(work, src, archs, out=out)
        return fails, out.getvalue()

    def clean(self):
        return [kernel(VEC), kernel(SCALAR, ld16=False, st16=False), kernel(MASK, maxntid=128, ld16=False, st16=False)]

    def test_clean_passes_with_table(self):
        fails, out = self.run_audit(self.clean())
        self.assertEqual(fails, [])
        row = [line for line in out.splitlines() if line.startswith("dropout ") and "dropout_kernel" in line][0]
        self.assertEqual(row.split()[2:5], ["sm_90", "2", "40"])  # target, instantiations, registers
        self.assertIn("1/1 of 1", row)  # the one vector instantiation has 16-byte loads and stores
        self.assertEqual(row.split()[-1], "6")  # 40 registers x 256 threads: 6 blocks per SM

    def test_spill_fails(self):
        ks = self.clean()
        ks[1] = kernel(SCALAR, st=8, ld=8, stack=8, ld16=False, st16=False)
        fails, _ = self.run_audit(ks)
        self.assertEqual(len(fails), 1)
        self.assertIn("[spill] dropout.cu dropout_kernel<float, false> sm_90: 8 bytes spill stores", fails[0])
        self.assertIn("ALLOWLIST", fails[0])

    def test_stack_frame_alone_fails(self):
        ks = self.clean()
        ks[0] = kernel(VEC, stack=16)
        fails, _ = self.run_audit(ks)
        self.assertEqual(len(fails), 1)
        self.assertIn("16 bytes stack frame", fails[0])

    def test_allowlist_and_its_ceiling(self):
        saved = ka.ALLOWLIST
        try:
            ka.ALLOWLIST = [("dropout", r"^dropout_kernel<float, false>$", "sm_90", 8, 8, 8, "test")]
            ks = self.clean()
            ks[1] = kernel(SCALAR, st=8, ld=8, stack=8, ld16=False, st16=False)
            fails, out = self.run_audit(ks)
            self.assertEqual(fails, [])
            self.assertIn("ALLOWED spill: dropout.cu ^dropout_kernel<float, false>$ sm_90 (1 instantiations", out)
            ks[1] = kernel(SCALAR, st=16, ld=8, stack=8, ld16=False, st16=False)
            fails, _ = self.run_audit(ks)
            self.assertEqual(len(fails), 1)
            self.assertIn("above its ALLOWLIST ceiling", fails[0])
            ks[1] = kernel(SCALAR, ld16=False, st16=False)  # fixed: the entry is stale, a note
            fails, out = self.run_audit(ks)
            self.assertEqual(fails, [])
            self.assertIn("stale ALLOWLIST entry", out)
        finally:
            ka.ALLOWLIST = saved

    def test_missing_launch_bounds_in_source_and_ptx(self):
        src = SOURCE.replace("__global__ void BOUNDS\n", "__global__ void\n")
        ks = self.clean()
        ks[2] = kernel(MASK, maxntid=None, ld16=False, st16=False)
        fails, _ = self.run_audit(ks, source=src)
        self.assertEqual(len(fails), 2)
        self.assertIn("[bounds] dropout.cu:5 mask_kernel: __global__ without __launch_bounds__", fails[0])
        self.assertIn("[bounds] dropout.cu mask_kernel sm_90: no .maxntid", fails[1])

    def test_registers_times_threads(self):
        ks = self.clean()
        ks[2] = kernel(MASK, regs=72, maxntid=1024, ld16=False, st16=False)  # 72 x 1024 > 65536
        fails, _ = self.run_audit(ks)
        self.assertEqual(len(fails), 1)
        self.assertIn("[regs] dropout.cu mask_kernel sm_90: 72 registers x 1024 threads", fails[0])
        ks[2] = kernel(MASK, regs=64, maxntid=1024, ld16=False, st16=False)  # exactly the register file
        self.assertEqual(self.run_audit(ks)[0], [])

    def test_static_shared_memory(self):
        ks = self.clean()
        ks[2] = kernel(MASK, smem=48 * 1024 + 4, maxntid=128, ld16=False, st16=False)
        fails, _ = self.run_audit(ks)
        self.assertEqual(len(fails), 1)
        self.assertIn("[smem] dropout.cu mask_kernel sm_90: 49156 bytes of static shared memory", fails[0])

    def test_vector_instantiation_without_16_byte_access(self):
        ks = self.clean()
        ks[0] = kernel(VEC, st16=False)  # st.global.v4.u16 is 8 bytes: not enough
        fails, _ = self.run_audit(ks)
        self.assertEqual(len(fails), 1)
        self.assertIn("[vector] dropout.cu dropout_kernel<float, true> compute_90: no 16-byte global store", fails[0])
        ks[0] = kernel(VEC, ld16=False, st16=False)
        self.assertIn("no 16-byte global load or store", self.run_audit(ks)[0][0])

    def test_unclassified_kernel(self):
        src = SOURCE + "__global__ void __launch_bounds__(64) new_kernel(unsigned *m) {}\n"
        fails, _ = self.run_audit(self.clean() + [kernel(NEW, maxntid=64)], source=src)
        self.assertEqual(len(fails), 1)
        self.assertIn("[vector] dropout.cu new_kernel: kernel not classified", fails[0])

    def test_ptxas_report_must_match_ptx(self):
        fails, _ = self.run_audit(self.clean(), ptxas_missing=(MASK,))
        self.assertTrue(any("[input] dropout.cu sm_90: ptxas reported 2 entries, the PTX has 3" in f for f in fails))

    def test_missing_ptx_for_an_arch(self):
        fails, _ = self.run_audit(self.clean(), archs="sm_80,sm_90")
        self.assertTrue(any("[input] dropout.cu compute_80: no PTX" in f for f in fails))


class Parts(unittest.TestCase):
    def test_16_byte_patterns(self):
        for s, want in [("ld.global.nc.v4.u32 {%r1,%r2,%r3,%r4}, [%rd1];", True),
                        ("ld.global.v4.f32 {%f1,%f2,%f3,%f4}, [%rd1];", True),
                        ("ld.global.nc.L1::no_allocate.v4.s32 {%r1,%r2,%r3,%r4}, [%rd1];", True),
                        ("ld.global.cs.v2.u64 {%rd1,%rd2}, [%rd3];", True),
                        ("ld.global.v4.u16 {%rs1,%rs2,%rs3,%rs4}, [%rd1];", False),
                        ("ld.global.v2.u32 {%r1,%r2}, [%rd1];", False),
                        ("ld.shared.v4.u32 {%r1,%r2,%r3,%r4}, [%r5];", False)]:
            self.assertEqual(bool(ka._ld16.search(s)), want, s)
        self.assertTrue(ka._st16.search("st.global.cs.v4.b32 [%rd1], {%r1,%r2,%r3,%r4};"))
        self.assertFalse(ka._st16.search("st.global.v2.u16 [%rd1], {%rs1,%rs2};"))

    def test_blocks_by_regs(self):
        self.assertEqual(ka.blocks_by_regs(64, 256), 4)
        self.assertEqual(ka.blocks_by_regs(40, 256), 6)
        self.assertEqual(ka.blocks_by_regs(63, 256), 4)  # 2016 registers per warp round up to 2048
        self.assertEqual(ka.blocks_by_regs(65, 1024), 0)

    def test_archs(self):
        self.assertEqual(ka.parse_archs("sm_80,sm_90,compute_90"), (["sm_80", "sm_90"], ["compute_80", "compute_90"]))
        self.assertEqual(ka.parse_archs("compute_90"), ([], ["compute_90"]))

    def test_base_and_args(self):
        self.assertEqual(ka.base_and_args("k<float, (Mode)0, S<int, 2>>"), ("k", ["float", "(Mode)0", "S<int, 2>"]))
        self.assertEqual(ka.base_and_args("k"), ("k", []))

    def test_strip_static(self):
        self.assertEqual(ka.strip_static(VEC), VEC[len(PRE):])
        self.assertEqual(ka.strip_static("_Z3fooPi"), "_Z3fooPi")


if __name__ == "__main__":
    unittest.main()
