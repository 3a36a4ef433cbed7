#!/usr/bin/env python3
"""The checks of scripts/kernel-audit.sh, from the compiler's own output (no GPU; Python 3 standard
library and c++filt). kernel-audit.sh compiles each kernels/X.cu as build.rs does, plus
`-Xptxas -v --keep`, into WORK: WORK/X.log is the ptxas report, WORK/X/*.ptx the PTX. Then:

  a. spills: no spill stores/loads and no stack frame (local memory) in any kernel on any sm_XY
     target, except the ALLOWLIST below (each entry: a ceiling and a one-line reason);
  b. launch bounds: every __global__ in kernels/ has __launch_bounds__ (source scan, and .maxntid
     in every PTX entry); registers (allocated per warp, 256 at a time) x max threads <= 65536;
     static shared memory <= 48 KB (dynamic shared memory above 48 KB is the launchers' opt-in);
  c. 16-byte global accesses (ld.global[.nc].v4 of 32-bit or .v2 of 64-bit elements, st.global
     alike) in the PTX of the bandwidth kernels' vector instantiations (VECTOR below); every other
     kernel is listed in NO_VECTOR with the reason it has no 16-byte path;
  d. a table per kernel and target: instantiations, registers, spills, stack, static shared memory,
     16-byte loads/stores, resident blocks per SM the registers allow.

  python3 scripts/kernel_audit.py --work WORK --src kernels --archs sm_80,sm_90,compute_90 [-v]
Exit status 1 with a FAIL line per problem, 0 otherwise. Tests: scripts/test_kernel_audit.py.
"""
import argparse
import collections
import glob
import math
import os
import re
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True

# ---- a. Spills allowed today: (file stem, kernel regex matched against the simplified demangled
# name, arch, ceiling on spill store bytes, on spill load bytes, on stack frame bytes, reason).
ALLOWLIST = [
    ("multi_sample", r"^ce_kernel<[^,]+, (__half|__nv_bfloat16), true, true>$", "sm_80", 8, 16, 8, "one 64-bit value spilled by the vector chunked CE kernel with a 16-bit gradient (documented)"),
    ("multi_sample", r"^ce_kernel<[^,]+, (__half|__nv_bfloat16), true, true>$", "sm_90", 8, 16, 8, "one 64-bit value spilled by the vector chunked CE kernel with a 16-bit gradient (documented)"),
    ("drop_block", r"^drop_block_apply_kernel<(__half|__nv_bfloat16), true, true>$", "sm_80", 4, 4, 8, "per-sample normalisation only (the default, global, is clean): one 32-bit value at 80 registers"),
    ("drop_block", r"^drop_block_apply_kernel<(__half|__nv_bfloat16), false, true>$", "sm_90", 4, 8, 8, "per-sample normalisation only (the default, global, is clean): one 32-bit value at 80 registers"),
    ("skip", r"^bias_partials_kernel<float, 1, false>$", "sm_80", 8, 8, 8,
     "the scalar (misaligned) f32 path of the bias-gradient partials: one 64-bit value"),
]

# ---- c. Kernels with a 16-byte path: (file stem, kernel) -> (index of the VEC template argument,
# or None when every instantiation is vectorised; what must be 16-byte: "ld", "st" or "ldst").
VECTOR = {
    ("dropout", "dropout_kernel"): (1, "ldst"),  # elementwise dropout forward/backward
    ("bias_dropout_residual", "forward_kernel"): (1, "ldst"),
    ("bias_dropout_residual", "backward_kernel"): (1, "ldst"),
    ("structured", "planes_kernel"): (None, "ldst"),  # vector body whenever x and y align alike
    ("structured", "locked_kernel"): (1, "ldst"),
    ("structured", "general_kernel"): (1, "ldst"),
    ("drop_block", "drop_block_apply_kernel"): (1, "ldst"),
    ("skip", "rows_kernel"): (1, "ldst"),  # stochastic depth, compaction gather/scatter, backward
    ("skip", "bias_partials_kernel"): (2, "ldst"),
    ("importance", "rows_kernel"): (1, "ld"),  # reads two hidden states, writes one f32 per token
    ("routing", "row_kernel"): (2, "ldst"),  # gather, gated scatter-add, gather backward
    ("routing", "scatter_backward_kernel"): (2, "ldst"),
    ("mc_dropout", "replicas_kernel"): (1, "ldst"),
    ("multi_sample", "copies_kernel"): (1, "ldst"),
    ("multi_sample", "reduce_kernel"): (2, "ldst"),
    ("multi_sample", "mean_kernel"): (2, "ldst"),
    ("multi_sample", "ce_kernel"): (3, "ldst"),  # logits in, gradient out
}
# Kernels without a 16-byte path, and why (not asserted).
NO_VECTOR = {
    ("dropout", "mask_kernel"): "writes only the bit mask (one u32 word per 32 elements)",
    ("drop_block", "drop_block_mask_kernel"): "mask generation in shared memory, bit-mask words out",
    ("drop_block", "drop_block_rows_kernel"): "warp-per-plane mask generation, bit-mask words out",
    ("bias_dropout_residual", "dbias_combine_kernel"): "small reduction over f32 partials",
    ("skip", "bias_combine_kernel"): "small reduction over f32 partials",
    ("skip", "slots_kernel"): "exclusive scan over u8 keep flags",
    ("importance", "finalize_kernel"): "one block reduces per-tile f64 sums",
    ("mc_dropout", "validate_kernel"): "scans probabilities for invalid values (scalar, read once)",
    ("mc_dropout", "push_kernel"): "per-class running moments; scalar accesses across samples",
    ("mc_dropout", "finish_kernel"): "per-class results from the running moments",
    ("multi_sample", "labels_kernel"): "label validation over i64 labels",
    ("multi_sample", "combine_kernel"): "small reduction of per-block loss partials",
    ("multi_sample_head", "bias_rows_kernel"): "column-parallel broadcast of the bias (coalesced scalar)",
    ("multi_sample_head", "colsum_partial_kernel"): "column sums, one column per lane (coalesced scalar)",
    ("multi_sample_head", "colsum_finish_kernel"): "column sums over chunk partials (coalesced scalar)",
    ("routing", "topk_select_kernel"): "radix select over u32 keys (shared memory)",
    ("routing", "global_hist_kernel"): "radix histogram over gate scores",
    ("routing", "global_count_kernel"): "counts per sequence",
    ("routing", "offsets_kernel"): "one-block scan of per-sequence counts",
    ("routing", "emit_kernel"): "index emission in ascending order (block scans)",
    ("philox_state", "philox_advance_kernel"): "one thread adds to the device Philox offset",
}

REG_FILE = 65536  # 32-bit registers per SM, sm_50 and later
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_STATIC_MAX = 48 * 1024

# ---- parsing -------------------------------------------------------------------------------------

_ptxas_compile = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_ptxas_props = re.compile(r"Function properties for (\S+)")
_ptxas_stack = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ptxas_used = re.compile(r"Used (\d+) registers(.*)")


def parse_ptxas(text):
    """{(mangled name, arch): dict(regs, stack, spill_st, spill_ld, smem, entry)} from `ptxas -v`."""
    out = {}
    arch = None
    cur = None  # the entry being compiled
    target = None  # the function whose properties come next
    for line in text.splitlines():
        m = _ptxas_compile.search(line)
        if m:
            arch = m.group(2)
            cur = out.setdefault((m.group(1), arch), dict(regs=None, stack=0, spill_st=0, spill_ld=0, smem=0,
                                                          entry=True))
            continue
        m = _ptxas_props.search(line)
        if m and arch is not None:
            target = out.setdefault((m.group(1), arch), dict(regs=None, stack=0, spill_st=0, spill_ld=0, smem=0,
                                                             entry=False))
            continue
        m = _ptxas_stack.search(line)
        if m and target is not None:
            target["stack"], target["spill_st"], target["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = _ptxas_used.search(line)
        if m and cur is not None:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", m.group(2))
            cur["smem"] = int(s.group(1)) if s else 0
    return out


_ptx_entry = re.compile(r"^(?:\.(?:visible|weak)\s+)?\.entry\s+([\w$.]+)\s*\(", re.M)
_ptx_target = re.compile(r"^\.target\s+sm_(\w+)", re.M)
_ld16 = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.(?:v4\.[bsuf]32|v2\.[bsuf]64)\b")
_st16 = re.compile(r"\bst\.global(?:\.[\w:]+)*?\.(?:v4\.[bsuf]32|v2\.[bsuf]64)\b")


def parse_ptx(text):
    """(virtual arch, {mangled entry: dict(maxntid, ld16, st16, dyn_smem)}) of one PTX file."""
    t = _ptx_target.search(text)
    arch = "compute_" + t.group(1) if t else None
    externs = re.findall(r"^\.extern\s+\.shared\b[^;]*?([\w$.]+)\[\]", text, re.M)
    out = {}
    for m in _ptx_entry.finditer(text):
        end = text.find("\n}", m.end())
        body = text[m.end():end if end >= 0 else len(text)]
        brace = body.find("{")
        head = body[:brace] if brace >= 0 else body
        mx = re.search(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", head)
        maxntid = None
        if mx:
            maxntid = 1
            for g in mx.groups():
                maxntid *= int(g) if g else 1
        out[m.group(1)] = dict(maxntid=maxntid, ld16=bool(_ld16.search(body)), st16=bool(_st16.search(body)),
                               dyn_smem=any(re.search(r"\b" + re.escape(e) + r"\b", body) for e in externs))
    return arch, out


def strip_static(name):
    """`__nv_static_<n>__<n characters>_ZN...` (relocatable device code, internal linkage) -> `_ZN...`."""
    m = re.match(r"__nv_static_(\d+)__", name)
    return name[m.end() + int(m.group(1)):] if m else name


def demangle(names):
    """Simplified demangled names: no namespaces, no parameter list, e.g. `ce_kernel<float, float, true, true>`."""
    names = list(names)
    if not names:
        return {}
    filt = shutil.which("c++filt")
    if not filt:
        sys.exit("kernel-audit: c++filt (binutils) is needed to read the kernels' names")
    res = subprocess.run([filt], input="\n".join(strip_static(n) for n in names), capture_output=True, text=True,
                         check=True).stdout.split("\n")
    out = {}
    for n, d in zip(names, res):
        d = d.replace("(anonymous namespace)::", "").replace("dropfuse::", "")
        d = re.sub(r"^void ", "", d)
        depth, cut = 0, len(d)
        for i, c in enumerate(d):  # drop the parameter list: the first '(' outside <...>
            if c == "<":
                depth += 1
            elif c == ">":
                depth -= 1
            elif c == "(" and depth == 0:
                cut = i
                break
        out[n] = d[:cut]
    return out


def base_and_args(simple):
    """`k<float, true, (Mode)0>` -> ("k", ["float", "true", "(Mode)0"])."""
    i = simple.find("<")
    if i < 0:
        return simple, []
    args, depth, cur = [], 0, ""
    for c in simple[i + 1:simple.rfind(">")]:
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        if c == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += c
    args.append(cur.strip())
    return simple[:i], args


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def strip_comments(src):
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def source_launch_bounds(files):
    """[(file, line, kernel)] for every __global__ function declared without __launch_bounds__."""
    texts = {f: strip_comments(read(f)) for f in files}
    macros = set()
    for t in texts.values():
        macros.update(re.findall(r"^\s*#\s*define\s+(\w+)\b[^\n]*__launch_bounds__", t, re.M))
    missing = []
    for f, t in texts.items():
        for m in re.finditer(r"\b__global__\b", t):
            if re.match(r"\s*#\s*define", t[t.rfind("\n", 0, m.start()) + 1:m.start()]):
                continue
            stop = min([i for i in (t.find("{", m.end()), t.find(";", m.end())) if i >= 0] or [len(t)])
            decl = t[m.end():stop]
            if re.search(r"\b__launch_bounds__\s*\(", decl) or any(re.search(r"\b%s\b" % x, decl) for x in macros):
                continue
            name = re.search(r"(\w+)\s*\(", decl)
            missing.append((os.path.basename(f), t.count("\n", 0, m.start()) + 1, name.group(1) if name else "?"))
    return missing


def blocks_by_regs(regs, threads):
    """Resident blocks per SM the register file allows (registers allocated per warp, 256 at a time)."""
    warp_regs = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    return (REG_FILE // warp_regs) // math.ceil(threads / 32)


def parse_archs(archs):
    """`sm_80,sm_90,compute_90` -> (["sm_80", "sm_90"], ["compute_80", "compute_90"]): ptxas targets and
    the virtual architectures whose PTX nvcc writes (sm_XY is compiled from compute_XY)."""
    sms, virt = [], []
    for a in (x.strip() for x in archs.split(",")):
        if not a:
            continue
        kind, _, num = a.partition("_")
        if kind == "sm":
            sms.append(a)
        if "compute_" + num not in virt:
            virt.append("compute_" + num)
    return sms, virt


# ---- the audit ----------------------------------------------------------------------------------


def audit(work, src, archs, verbose=False, out=sys.stdout):
    """Runs checks a-c on WORK, prints the table (d) and the problems; returns the list of failures."""
    sms, virts = parse_archs(archs)
    fails, notes = [], []
    cu = sorted(glob.glob(os.path.join(src, "*.cu")))
    stems = [os.path.splitext(os.path.basename(f))[0] for f in cu]

    ptxas, ptx = {}, {}  # stem -> parse results
    for s in stems:
        log = os.path.join(work, s + ".log")
        ptxas[s] = parse_ptxas(read(log)) if os.path.exists(log) else {}
        ptx[s] = {}
        for p in glob.glob(os.path.join(work, s, "*.ptx")):
            arch, entries = parse_ptx(read(p))
            if arch:
                ptx[s][arch] = entries
        for v in virts:
            if v not in ptx[s]:
                fails.append(f"[input] {s}.cu {v}: no PTX found in {work}/{s}/ (did nvcc run with --keep?)")
        for a in sms:
            want = len(ptx[s].get("compute_" + a[3:], {}))
            got = sum(1 for (n, arch), r in ptxas[s].items() if arch == a and r["entry"])
            if got != want:
                fails.append(f"[input] {s}.cu {a}: ptxas reported {got} entries, the PTX has {want}: "
                             f"is {s}.log the `-Xptxas -v` output?")

    names = demangle({n for s in stems for n, _ in ptxas[s]} | {n for s in stems for e in ptx[s].values() for n in e})

    # (b) source: __launch_bounds__ on every __global__ of kernels/ (headers included).
    srcs = sorted(glob.glob(os.path.join(src, "**", "*.cu*"), recursive=True) +
                  glob.glob(os.path.join(src, "**", "*.h"), recursive=True))
    for f, line, k in source_launch_bounds(srcs):
        fails.append(f"[bounds] {f}:{line} {k}: __global__ without __launch_bounds__: add "
                     f"__launch_bounds__(max threads per block[, min blocks per SM]) so that ptxas budgets its registers")

    allow_used = collections.Counter()
    rows = collections.OrderedDict()  # (stem, base, target) -> aggregate
    targets = sms + [v for v in virts if "sm_" + v[8:] not in sms]
    for s in stems:
        for t in targets:
            virt = "compute_" + t.split("_", 1)[1]
            entries = ptx[s].get(virt, {})
            for mangled, pe in sorted(entries.items(), key=lambda kv: names[kv[0]]):
                simple = names[mangled]
                base, args = base_and_args(simple)
                r = ptxas[s].get((mangled, t)) if t.startswith("sm_") else None
                key = (s, base, t)
                agg = rows.setdefault(key, dict(n=0, regs=[], thr=set(), st=0, ld=0, stack=0, smem=0, dyn=False,
                                                vec_req=0, vec_ld=0, vec_st=0, blocks=[]))
                agg["n"] += 1
                agg["dyn"] |= pe["dyn_smem"]
                where = f"{s}.cu {simple} {t}"
                # (b) launch bounds in the PTX
                if pe["maxntid"] is None:
                    fails.append(f"[bounds] {where}: no .maxntid in the PTX (no __launch_bounds__): add one")
                else:
                    agg["thr"].add(pe["maxntid"])
                # (a), (b) resources
                if r is not None and r["regs"] is not None:
                    agg["regs"].append(r["regs"])
                    agg["smem"] = max(agg["smem"], r["smem"])
                    agg["st"], agg["ld"] = max(agg["st"], r["spill_st"]), max(agg["ld"], r["spill_ld"])
                    agg["stack"] = max(agg["stack"], r["stack"])
                    if pe["maxntid"]:
                        b = blocks_by_regs(r["regs"], pe["maxntid"])
                        agg["blocks"].append(b)
                        if b < 1:
                            fails.append(f"[regs] {where}: {r['regs']} registers x {pe['maxntid']} threads "
                                         f"(__launch_bounds__) exceed the {REG_FILE}-register file (allocated "
                                         f"{REG_UNIT} per warp): lower the bound or the register use")
                    if r["smem"] > SMEM_STATIC_MAX:
                        fails.append(f"[smem] {where}: {r['smem']} bytes of static shared memory > 48 KB: "
                                     f"move it to dynamic shared memory with a launcher opt-in")
                    if r["spill_st"] or r["spill_ld"] or r["stack"]:
                        msg = (f"{where}: {r['spill_st']} bytes spill stores, {r['spill_ld']} bytes spill loads, "
                               f"{r['stack']} bytes stack frame")
                        hit = None
                        for i, (fs, pat, arch, mst, mld, mstack, reason) in enumerate(ALLOWLIST):
                            if fs == s and arch == t and re.search(pat, simple):
                                hit = i
                                break
                        if hit is None:
                            fails.append(f"[spill] {msg}: local memory in a kernel; lower its register pressure "
                                         f"(fewer values in flight, a smaller min-blocks in __launch_bounds__) or, "
                                         f"if it must stay, add an ALLOWLIST entry with the reason in "
                                         f"scripts/kernel_audit.py")
                        else:
                            fs, pat, arch, mst, mld, mstack, reason = ALLOWLIST[hit]
                            allow_used[hit] += 1
                            if r["spill_st"] > mst or r["spill_ld"] > mld or r["stack"] > mstack:
                                fails.append(f"[spill] {msg}: above its ALLOWLIST ceiling ({mst} stores, {mld} "
                                             f"loads, {mstack} stack; '{reason}'): the spill grew, fix it or "
                                             f"justify a new ceiling")
                            elif verbose:
                                notes.append(f"allowed spill: {msg}")
                # (c) 16-byte accesses, on the PTX (once per virtual arch)
                rule = VECTOR.get((s, base))
                if (s, base) not in VECTOR and (s, base) not in NO_VECTOR:
                    fails.append(f"[vector] {s}.cu {base}: kernel not classified: add it to VECTOR (with the "
                                 f"VEC template argument) or NO_VECTOR (with the reason) in scripts/kernel_audit.py")
                    continue
                if rule is None:
                    continue
                idx, need = rule
                if idx is not None and (idx >= len(args) or args[idx] != "true"):
                    continue
                agg["vec_req"] += 1
                agg["vec_ld"] += pe["ld16"]
                agg["vec_st"] += pe["st16"]
                lack = [w for w, ok in (("load", pe["ld16"] or "ld" not in need), ("store", pe["st16"] or "st" not in need))
                        if not ok]
                if lack:  # each virtual architecture's PTX is visited once (targets)
                    fails.append(f"[vector] {s}.cu {simple} {virt}: no 16-byte global {' or '.join(lack)} "
                                 f"(ld/st.global.v4 of 32-bit or .v2 of 64-bit elements) in the PTX of a vector "
                                 f"instantiation: restore the uint4 path (common/vec.cuh load_elems/store_elems), "
                                 f"or move the kernel to NO_VECTOR with the reason")

    for i, entry in enumerate(ALLOWLIST):
        if entry[2] in sms and entry[0] in stems and not allow_used[i]:
            notes.append(f"stale ALLOWLIST entry ({entry[0]}, {entry[1]}, {entry[2]}): nothing spills there now, "
                         f"remove it")

    fails = list(dict.fromkeys(fails))  # one line per problem

    # ---- (d) the table
    w = max([len(k[1]) for k in rows] + [6])
    out.write(f"{'file':<22} {'kernel':<{w}} {'target':<10} {'inst':>4} {'regs':>7} {'thr':>5} {'spill st/ld':>11} "
              f"{'stack':>5} {'smem':>6} {'v16 ld/st':>11} {'blk/SM':>6}\n")
    for (s, base, t), a in rows.items():
        regs = (f"{min(a['regs'])}-{max(a['regs'])}" if min(a["regs"]) != max(a["regs"]) else str(a["regs"][0])) \
            if a["regs"] else "-"
        thr = "/".join(str(x) for x in sorted(a["thr"])) or "-"
        spill = f"{a['st']}/{a['ld']}" if a["regs"] else "-"
        stack = str(a["stack"]) if a["regs"] else "-"
        smem = (str(a["smem"]) if a["regs"] else "-") + ("+d" if a["dyn"] else "")
        need = VECTOR.get((s, base), (None, ""))[1]
        vec = (f"{a['vec_ld'] if 'ld' in need else '-'}/{a['vec_st'] if 'st' in need else '-'} of {a['vec_req']}"
               if a["vec_req"] else "-")
        blk = str(min(a["blocks"])) if a["blocks"] else "-"
        out.write(f"{s:<22} {base:<{w}} {t:<10} {a['n']:>4} {regs:>7} {thr:>5} {spill:>11} {stack:>5} {smem:>6} "
                  f"{vec:>11} {blk:>6}\n")
    out.write("(per kernel and target over its instantiations: regs min-max, spills/stack/smem maximum in bytes, "
              "+d: uses dynamic shared memory, v16: vector instantiations with 16-byte loads/stores, blk/SM: "
              "fewest resident blocks per SM the registers allow at the launch bound)\n")
    for i, (fs, pat, arch, mst, mld, mstack, reason) in enumerate(ALLOWLIST):
        if allow_used[i]:
            out.write(f"ALLOWED spill: {fs}.cu {pat} {arch} ({allow_used[i]} instantiations, ceiling {mst}/{mld} "
                      f"bytes, stack {mstack}): {reason}\n")
    optin = []
    for f in sorted(glob.glob(os.path.join(src, "*.cu"))):
        for n, line in enumerate(read(f).splitlines(), 1):
            if "cudaFuncAttributeMaxDynamicSharedMemorySize" in line and "cudaFuncSetAttribute" in line:
                optin.append(f"{os.path.basename(f)}:{n}")
    dyn = sorted({f"{k[0]}.cu {k[1]}" for k, a in rows.items() if a["dyn"]})
    if dyn:
        out.write(f"dynamic shared memory: {', '.join(dyn)}; opt-in above 48 KB (cudaFuncSetAttribute): "
                  f"{', '.join(optin) or 'none'}\n")
    for n in notes:
        out.write(f"note: {n}\n")
    for f in fails:
        out.write(f"FAIL {f}\n")
    return fails


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="kernel-audit.sh's output: X.log and X/*.ptx per kernels/X.cu")
    ap.add_argument("--src", default="kernels")
    ap.add_argument("--archs", default="sm_80,sm_90,compute_90")
    ap.add_argument("-v", "--verbose", action="store_true", help="also list every allowed spill")
    a = ap.parse_args(argv)
    fails = audit(a.work, a.src, a.archs, a.verbose)
    print(f"kernel-audit: {'FAILED, ' + str(len(fails)) + ' problem(s)' if fails else 'passed'}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
