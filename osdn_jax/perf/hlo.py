"""Read XLA's optimized HLO text (``compiled.as_text()``) into the kernels a device would launch,
with the work and the memory traffic of each.

A *kernel* here is one top-level fusion, library call (cuBLAS, a Pallas kernel), collective or copy
of the program, visited from the entry computation into ``while`` bodies (multiplied by their
``known_trip_count``), ``call`` s, async wrappers and the heaviest branch of a ``conditional``. For
each kernel:

- **FLOPs by product precision** (``osdn_jax.hardware``: ``bf16``, ``tf32``, ``fp32`` on GPUs;
  ``bf16``, ``bf16_3x``, ``bf16_6x`` on TPUs): ``2 · M · N · K`` per ``dot`` (``convolution`` on
  TPUs) inside it, classed by the operand dtype and ``operand_precision`` / ``algorithm``;
  elementwise and reduction work (1 per element, as XLA's cost analysis counts it) apart as
  ``vector``; transcendental functions apart. Pallas calls are counted from their own IR
  (``osdn_jax.perf.pallas``), cuBLAS calls from their shapes.
- **HBM bytes**: every operand read once and every result written once, except that an operand a
  fusion only slices costs the slices, and a ``dynamic-update-slice`` done in place costs its update.
  Re-reads that miss the cache are not counted: it is a lower bound.

The walk is target-independent; ``osdn_jax.perf.roofline`` turns kernels into time on a chip.
"""

from __future__ import annotations

import dataclasses
import math
import re

BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
         "f8e4m3fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
         "f64": 8, "c64": 8, "c128": 16, "token": 0}

# Opcodes that launch nothing: bookkeeping, and the second half of async pairs.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
         "opt-barrier", "add-dependency", "domain", "fusion-done", "async-done", "async-update", "copy-done",
         "copy-start",  # TPU: a prefetch into on-chip memory; its HBM read is the consumer's
         "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done", "recv-done", "send", "recv"}
_COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-permute-start", "ragged-all-to-all", "collective-broadcast"}
_LAUNCHES = {"fusion", "fusion-start", "custom-call"} | _COLLECTIVES
_FREE_CUSTOM = {"AllocateBuffer", "ConcatBitcast"}  # TPU bookkeeping calls: no kernel of their own
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select",
                "clamp", "and", "or", "xor", "not", "remainder", "power", "sign", "floor", "ceil",
                "round-nearest-even", "round-nearest-afz", "is-finite", "shift-left", "shift-right-logical",
                "shift-right-arithmetic", "atan2"}
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "sqrt", "rsqrt",
                   "cbrt", "sine", "cosine", "tan", "erf"}
_SLICES = {"slice", "dynamic-slice", "gather"}


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> float:
        return self.size * BYTES.get(self.dtype, 4)


_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def parse_shape(text: str) -> list[Array]:
    """Every array in an HLO shape (a tuple flattened), layouts ignored."""
    return [Array(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in _ARRAY.finditer(_strip_layouts(text))]


def _strip_layouts(text: str) -> str:
    return re.sub(r"\{[^{}]*\}", "", text)


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # as printed (a tuple in parentheses, or one array with its layout)
    opcode: str
    operands: list[str]  # names of operand instructions
    attrs: str  # everything after the operand list
    operand_text: str = ""  # the operand list as printed (a parameter's number, a constant's value)
    is_root: bool = False

    def arrays(self) -> list[Array]:
        return parse_shape(self.shape)

    def attr(self, key: str) -> str | None:
        """The value of ``key=`` (a name, a ``{...}`` group or a quoted string), or None."""
        m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        return _balanced_value(self.attrs, m.end())

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


def _balanced_value(text: str, i: int) -> str:
    if text[i] == '"':
        j = text.index('"', i + 1)
        return text[i + 1:j]
    if text[i] == "{":
        depth, j = 0, i
        while True:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
            j += 1
    m = re.match(r"[^,\s]+", text[i:])
    return m.group(0)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    is_entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}
        self.params = sorted((i for i in self.instructions if i.opcode == "parameter"),
                             key=lambda i: int(re.match(r"\s*(\d+)", i.operand_text).group(1)))
        self.users: dict[str, list[Instruction]] = {}
        for inst in self.instructions:
            for op in inst.operands:
                self.users.setdefault(op, []).append(inst)
        roots = [i for i in self.instructions if i.is_root]
        self.root = roots[-1] if roots else (self.instructions[-1] if self.instructions else None)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s+=\s+")


def _close(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``text[i]`` (strings skipped: backend
    configs hold brackets)."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == '"':
            j = text.index('"', j + 1)
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError(f"unbalanced {open_!r} in HLO line: {text[:200]}")


def parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    i = m.end()
    if line[i] == "(":
        end = _close(line, i, "(", ")")
    else:
        end = line.index(" ", i)
    shape = line[i:end]
    rest = line[end:].lstrip()
    op = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not op:
        return None
    start = op.end() - 1
    close = _close(rest, start, "(", ")")
    operand_text = rest[start + 1:close - 1]
    operands = re.findall(r"%([\w.\-]+)", operand_text)
    return Instruction(m.group(2), shape, op.group(1), operands, rest[close:].lstrip(", "), operand_text,
                       bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """``({name: Computation}, entry name)`` of an HLO module's text."""
    comps, entry, current, name, is_entry = {}, None, None, None, False
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current, name, is_entry = [], h.group(2), bool(h.group(1))
            continue
        if line.startswith("}"):
            comps[name] = Computation(name, current, is_entry)
            if is_entry:
                entry = name
            current = None
            continue
        inst = parse_instruction(line)
        if inst is not None:
            current.append(inst)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


# ----------------------------------------------------------------------------------------------
# the work of one kernel


@dataclasses.dataclass
class Kernel:
    """One launch site; ``count`` times per program run. FLOPs and bytes are per launch."""

    name: str  # the instruction's name
    kind: str  # fusion kind, custom-call target, collective or copy
    op_name: str  # JAX's name for the op (metadata)
    count: int
    flops: dict[str, float]  # by precision class (see the module docstring), "vector" for elementwise
    transcendentals: float
    bytes: float
    comm_bytes: float = 0.0  # collectives: bytes each device sends
    note: str = ""  # why the count is incomplete, where it is
    dynamic: bool = False  # inside a loop whose trip count depends on the data: counted as one trip

    @property
    def matmul_flops(self) -> float:
        return sum(v for k, v in self.flops.items() if k != "vector")


def dot_class(platform: str, dtypes: list[str], precision: str | None, algorithm: str | None) -> str:
    """The precision class (``osdn_jax.hardware``) a product of operands ``dtypes`` runs at."""
    if algorithm:
        a = algorithm.lower()
        if "x6" in a or "f32_f32_f32" in a:
            return "bf16_6x" if platform == "tpu" else "fp32"
        if "x3" in a:
            return "bf16_3x" if platform == "tpu" else "tf32"
        if "tf32" in a:
            return "tf32"
        return "bf16"
    if all(d in ("bf16", "f16") or d.startswith(("f8", "s8", "u8", "s4")) for d in dtypes):
        return "bf16"
    p = (precision or "default").split(",")[0].strip().lower()
    if platform == "tpu":
        return {"highest": "bf16_6x", "high": "bf16_3x"}.get(p, "bf16")
    return "fp32" if p == "highest" else "tf32"


def _dims(attr: str | None) -> list[int]:
    return [int(d) for d in attr.split(",") if d.strip()] if attr else []


def _dot_flops(inst: Instruction, comp: Computation) -> tuple[float, list[str]]:
    lhs = _operand_array(inst, comp, 0)
    contracting = math.prod(lhs.dims[d] for d in _dims(inst.attr("lhs_contracting_dims"))) if lhs else 1
    out = inst.arrays()[0]
    dtypes = [a.dtype for a in (_operand_array(inst, comp, 0), _operand_array(inst, comp, 1)) if a is not None]
    return 2.0 * out.size * contracting, dtypes


def _conv_flops(inst: Instruction, comp: Computation) -> tuple[float, list[str]]:
    """``2 · outputs · input features · taps``, where a tap on a hole of a base-dilated input does
    not count (TPUs express a batched product as a convolution whose window walks the batch dims
    over such holes: one real tap each)."""
    rhs = _operand_array(inst, comp, 1)
    out = inst.arrays()[0]
    labels = (inst.attr("dim_labels") or "").split("_")
    features = 1
    if rhs is not None and len(labels) == 2:
        rhs_labels = labels[1].split("->")[0]
        if "i" in rhs_labels and len(rhs_labels) == len(rhs.dims):
            features = rhs.dims[rhs_labels.index("i")]
    window = inst.attr("window") or ""
    size = re.search(r"size=([\dx]+)", window)
    dilate = re.search(r"lhs_dilate=([\dx]+)", window)
    sizes = [int(d) for d in size.group(1).split("x")] if size else []
    dilates = [int(d) for d in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
    taps = math.prod(-(-s // d) for s, d in zip(sizes, dilates))
    dtypes = [a.dtype for a in (_operand_array(inst, comp, 0), rhs) if a is not None]
    return 2.0 * out.size * features * taps, dtypes


def _operand_array(inst: Instruction, comp: Computation, i: int) -> Array | None:
    if i >= len(inst.operands):
        return None
    src = comp.by_name.get(inst.operands[i])
    if src is None:
        return None
    arrays = src.arrays()
    return arrays[0] if arrays else None


class Program:
    """An optimized HLO module: its computations and the kernels it launches."""

    def __init__(self, text: str, platform: str, pallas_flops=None):
        """``platform``: "gpu" or "tpu" (how fp32 products are classed); ``pallas_flops(inst)`` →
        ``(flops by class, note)`` for a Pallas custom call (``osdn_jax.perf.pallas.kernel_flops``)."""
        self.platform = platform
        self.comps, self.entry = parse_module(text)
        self._pallas_flops = pallas_flops
        self.notes: list[str] = []
        self.kernels: list[Kernel] = self._walk(self.comps[self.entry], 1)

    # -- the walk over launch sites ------------------------------------------------------------

    def _walk(self, comp: Computation, count: int) -> list[Kernel]:
        """The kernels ``comp`` launches, each ``count`` times per run of it."""
        kernels = []
        for inst in comp.instructions:
            op = inst.opcode
            if op in _FREE or (op == "custom-call" and inst.attr("custom_call_target") in _FREE_CUSTOM):
                continue
            if op == "while":
                trips = trip_count(inst, comp, self.comps)
                if trips is None:
                    self.notes.append(f"{inst.name}: while loop without a known trip count, counted once")
                body = self._walk(self.comps[inst.attr("body").lstrip("%")], count * (trips or 1))
                if trips is None:
                    body = [dataclasses.replace(k, dynamic=True) for k in body]
                    kernels += self._walk(self.comps[inst.attr("condition").lstrip("%")], count)
                kernels += body
            elif op in ("call", "async-start"):
                target = inst.attr("to_apply") or inst.attr("calls")
                kernels += self._walk(self.comps[target.lstrip("%")], count)
            elif op == "conditional":
                kernels += self._heaviest_branch(inst, count)
            elif self.platform == "tpu" and op not in _LAUNCHES and all(not a.dims for a in inst.arrays()):
                continue  # a TPU's scalar unit runs unfused scalar ops (loop counters) beside the kernels
            else:
                kernels.append(self._kernel(inst, comp, count))
        return kernels

    def _heaviest_branch(self, inst: Instruction, count: int) -> list[Kernel]:
        names = re.findall(r"%?([\w.\-]+)", inst.attr("branch_computations") or "")
        if not names:
            names = [n.lstrip("%") for n in (inst.attr("true_computation"), inst.attr("false_computation")) if n]
        self.notes.append(f"{inst.name}: conditional, the branch with the most bytes counted")
        branches = [self._walk(self.comps[name], count) for name in names]
        return max(branches, key=lambda ks: sum(k.bytes * k.count for k in ks), default=[])

    # -- one kernel ----------------------------------------------------------------------------

    def _kernel(self, inst: Instruction, comp: Computation, count: int) -> Kernel:
        op = inst.opcode
        flops: dict[str, float] = {}
        transcendentals, note, comm = 0.0, "", 0.0
        operand_bytes = [self._operand_bytes(comp, name) for name in inst.operands]
        if op in ("fusion", "fusion-start"):
            called = self.comps[inst.attr("calls").lstrip("%")]
            transcendentals = self._fused_work(called, flops)
            reads = sum(self._param_reads(called, i, full) for i, full in enumerate(operand_bytes))
            out = inst.arrays()[1:2] if op == "fusion-start" else inst.arrays()
            writes = self._root_writes(called, sum(a.bytes for a in out))
            kind = _fusion_kind(inst)
        elif op == "custom-call":
            kind = inst.attr("custom_call_target") or "custom-call"
            outs = [a for a in inst.arrays() if not (a.dtype in ("s8", "u8") and len(a.dims) == 1 and "cublas" in kind)]
            reads, writes = sum(operand_bytes), sum(a.bytes for a in outs)
            note = self._custom_call_flops(inst, comp, kind, flops)
        elif op in _COLLECTIVES:
            kind = op.removesuffix("-start")
            reads = sum(operand_bytes)
            writes = max((a.bytes for a in inst.arrays()), default=0.0)
            comm = _link_bytes(kind, reads, writes, _group_size(inst))
        else:  # copies and any unfused instruction: a kernel of its own
            kind = op
            transcendentals = self._instruction_work(inst, comp, flops)
            reads = sum(operand_bytes)
            writes = sum(a.bytes for a in inst.arrays())
        return Kernel(inst.name, kind, inst.op_name, count, flops, transcendentals, reads + writes, comm, note)

    def _operand_bytes(self, comp: Computation, name: str) -> float:
        src = comp.by_name.get(name)
        if src is None:
            return 0.0
        arrays = src.arrays()
        if src.opcode == "fusion-start":
            arrays = arrays[-2:-1]
        return float(sum(a.bytes for a in arrays))

    def _param_reads(self, comp: Computation, index: int, full: float) -> float:
        """Bytes a fused computation reads from its parameter ``index`` (``full``: its size)."""
        if index >= len(comp.params):
            return full
        return self._reads_of(comp, comp.params[index].name, full, None)

    def _reads_of(self, comp: Computation, name: str, full: float, outer) -> float:
        """Bytes read of the value ``name`` (a view of an operand of ``full`` bytes) in ``comp``;
        ``outer``: ``(computation, instruction, its outer)`` where ``comp`` is a nested fusion, whose
        result is then read as its consumers read it."""
        if comp.root is not None and comp.root.name == name:
            return full if outer is None else self._reads_of(outer[0], outer[1], full, outer[2])
        total = 0.0
        for u in comp.users.get(name, []):
            if u.opcode in _SLICES and u.operands and u.operands[0] == name:
                total += sum(a.bytes for a in u.arrays())
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                continue  # updated in place: only the update is touched (counted as written)
            elif u.opcode == "bitcast":
                total += self._reads_of(comp, u.name, full, outer)
            elif u.opcode == "fusion":
                inner = self.comps[u.attr("calls").lstrip("%")]
                for i, op in enumerate(u.operands):
                    if op == name and i < len(inner.params):
                        total += self._reads_of(inner, inner.params[i].name, full, (comp, u.name, outer))
            else:
                return full
        return min(total, full)

    def _root_writes(self, comp: Computation, full: float) -> float:
        root = comp.root
        outs = [root]
        if root is not None and root.opcode == "tuple":
            outs = [comp.by_name.get(n) for n in root.operands]
        if root is None or not any(o is not None and o.opcode == "dynamic-update-slice" for o in outs):
            return full
        total = 0.0
        for o in outs:
            if o is None:
                continue
            if o.opcode == "dynamic-update-slice":
                update = _operand_array(o, comp, 1)
                total += update.bytes if update else 0.0
            else:
                total += sum(a.bytes for a in o.arrays())
        return total

    def _fused_work(self, comp: Computation, flops: dict[str, float]) -> float:
        transcendentals = 0.0
        for inst in comp.instructions:
            if inst.opcode == "fusion":
                transcendentals += self._fused_work(self.comps[inst.attr("calls").lstrip("%")], flops)
            else:
                transcendentals += self._instruction_work(inst, comp, flops)
        return transcendentals

    def _instruction_work(self, inst: Instruction, comp: Computation, flops: dict[str, float]) -> float:
        op = inst.opcode
        if op in ("dot", "convolution"):
            n, dtypes = (_dot_flops if op == "dot" else _conv_flops)(inst, comp)
            cls = dot_class(self.platform, dtypes, inst.attr("operand_precision"), inst.attr("algorithm"))
            flops[cls] = flops.get(cls, 0.0) + n
            return 0.0
        arrays = inst.arrays()
        size = arrays[0].size if arrays else 0
        if op in _ELEMENTWISE:
            flops["vector"] = flops.get("vector", 0.0) + size
        elif op in _TRANSCENDENTAL:
            return float(size)
        elif op == "reduce":
            src = _operand_array(inst, comp, 0)
            flops["vector"] = flops.get("vector", 0.0) + (src.size if src else size)
        elif op == "reduce-window":
            window = re.search(r"size=([\dx]+)", inst.attr("window") or "")
            taps = math.prod(int(d) for d in window.group(1).split("x")) if window else 1
            flops["vector"] = flops.get("vector", 0.0) + size * taps
        return 0.0

    def _custom_call_flops(self, inst: Instruction, comp: Computation, target: str, flops: dict[str, float]) -> str:
        if "triangularSolve" in target or "trsm" in target:  # cuBLAS; LAPACK on a CPU
            a, b = _operand_array(inst, comp, 0), _operand_array(inst, comp, 1)
            left = '"left_side":true' in inst.attrs or "trsm" in target
            if a is not None and b is not None:
                m = a.dims[-1]
                n = b.dims[-1] if left else b.dims[-2]
                batch = math.prod(b.dims[:-2])
                cls = dot_class(self.platform, [a.dtype], "highest", None)
                flops[cls] = flops.get(cls, 0.0) + float(batch) * m * m * n  # m²n/2 multiply-adds
            return ""
        if target == "InvertDiagBlocksLowerTriangular":  # TPU: the solve's b × b diagonal blocks inverted
            out = inst.arrays()[0]
            b = out.dims[-1]
            cls = dot_class(self.platform, [out.dtype], "highest", None)
            flops[cls] = flops.get(cls, 0.0) + math.prod(out.dims[:-2]) * b**3 / 3  # b³/3 per triangular inverse
            return ""
        if "gemm" in target or "matmul" in target:
            return self._gemm_flops(inst, comp, flops)
        if self._pallas_flops is not None and ("triton" in target or "mosaic" in target):
            counted, note = self._pallas_flops(inst)
            for k, v in counted.items():
                flops[k] = flops.get(k, 0.0) + v
            return note
        return f"FLOPs of custom call {target} not counted"

    def _gemm_flops(self, inst: Instruction, comp: Computation, flops: dict[str, float]) -> str:
        lhs = _operand_array(inst, comp, 0)
        out = [a for a in inst.arrays() if not (a.dtype in ("s8", "u8") and len(a.dims) == 1)][0]
        contracting = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)\]', inst.attrs)
        if lhs is None or contracting is None:
            return "cuBLAS call: FLOPs not counted"
        k = math.prod(lhs.dims[int(d)] for d in contracting.group(1).replace('"', "").split(",") if d)
        precision = re.search(r'"operand_precision":\["(\w+)"', inst.attrs)
        algorithm = re.search(r'"algorithm":"(\w+)"', inst.attrs)
        cls = dot_class(self.platform, [lhs.dtype], precision.group(1) if precision else None,
                        algorithm.group(1) if algorithm and "UNSET" not in algorithm.group(1) else None)
        flops[cls] = flops.get(cls, 0.0) + 2.0 * out.size * k
        return ""


def _group_size(inst: Instruction) -> int:
    """Devices in each replica group of a collective (2 where the groups are not spelled out)."""
    groups = inst.attr("replica_groups") or ""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", inst.attrs)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", inst.attrs)  # the named axes taking part
    if mesh:
        return max(2, math.prod(int(n) for n in re.findall(r"=(\d+)", mesh.group(1))))
    first = re.search(r"\{([\d,\s]+)\}", groups)
    if first:
        return len([d for d in first.group(1).split(",") if d.strip()])
    pairs = re.search(r"source_target_pairs=", inst.attrs)
    return 2 if pairs or not groups else max(2, len(re.findall(r"\d+", groups)))


def _link_bytes(kind: str, operand: float, result: float, n: int) -> float:
    """Bytes one device sends over its links for a collective over ``n`` devices (ring algorithms):
    all-gather ``(n−1)/n`` of the result, reduce-scatter and all-to-all ``(n−1)/n`` of the operand,
    all-reduce twice that, a permute its operand."""
    share = (n - 1) / n
    return {"all-gather": result * share, "reduce-scatter": operand * share, "all-reduce": 2 * operand * share,
            "all-to-all": operand * share, "ragged-all-to-all": operand * share}.get(kind, operand)


def trip_count(loop: Instruction, comp: Computation, comps: dict[str, Computation]) -> int | None:
    """Trips of a ``while``: XLA's ``known_trip_count`` (GPU), else read off the loop (TPU's HLO
    has none): a condition ``i < N`` (or ``<=``, ``>``, ``>=``) on a tuple element ``i`` that starts at a
    constant and that the body steps by a constant (each possibly inside a fusion). None when the
    loop is not of that form."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond, body = (comps.get((loop.attr(k) or "").lstrip("%")) for k in ("condition", "body"))
    init = comp.by_name.get(loop.operands[0]) if loop.operands else None
    if None in (cond, body, init) or init.opcode != "tuple" or cond.root is None or body.root is None:
        return None
    test = _expr(cond, cond.root.name, comps)
    if not (isinstance(test, tuple) and test[0] == "compare"):
        return None
    _, direction, lhs, rhs = test
    if isinstance(rhs, tuple) and isinstance(lhs, int):
        lhs, rhs = rhs, lhs
        direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)
    if not (isinstance(lhs, tuple) and lhs[0] == "element" and isinstance(rhs, int)):
        return None
    index, bound = lhs[1], rhs
    if body.root.opcode != "tuple" or index >= len(init.operands) or index >= len(body.root.operands):
        return None
    start = _expr(comp, init.operands[index], comps)
    update = _expr(body, body.root.operands[index], comps)
    if not isinstance(start, int) or not (isinstance(update, tuple) and update[0] == "op"):
        return None
    _, kind, a, b = update
    if a == ("element", index) and isinstance(b, int):
        step = b if kind == "add" else -b
    elif b == ("element", index) and isinstance(a, int) and kind == "add":
        step = a
    else:
        return None
    span = {"LT": bound - start, "LE": bound - start + 1, "GT": start - bound, "GE": start - bound + 1}.get(direction)
    if span is None or step == 0 or (step < 0) != (direction in ("GT", "GE")):
        return None
    return max(0, -(-span // abs(step)))


def _expr(comp: Computation, name: str, comps: dict[str, Computation], env: list | None = None):
    """A scalar integer expression behind ``name``: an int (a constant), ``("element", i)`` (element
    ``i`` of the loop's tuple parameter), ``("op", opcode, a, b)`` for add / subtract,
    ``("compare", direction, a, b)``; None for anything else. Fusions are looked into, with their
    parameters bound to ``env``."""
    inst = comp.by_name.get(name)
    if inst is None:
        return None
    op = inst.opcode
    if op in ("copy", "bitcast", "convert") and inst.operands:
        return _expr(comp, inst.operands[0], comps, env)
    if op == "constant":
        m = re.fullmatch(r"\s*(-?\d+)\s*", inst.operand_text)
        return int(m.group(1)) if m else None
    if op == "parameter":
        if env is None:
            return ("tuple parameter",)
        number = int(re.match(r"\s*(\d+)", inst.operand_text or "0").group(1))
        return env[number] if number < len(env) else None
    if op == "get-tuple-element":
        if _expr(comp, inst.operands[0], comps, env) == ("tuple parameter",):
            return ("element", int(inst.attr("index")))
        return None
    if op == "fusion":
        inner = comps.get((inst.attr("calls") or "").lstrip("%"))
        if inner is None or inner.root is None:
            return None
        return _expr(inner, inner.root.name, comps, [_expr(comp, o, comps, env) for o in inst.operands])
    if op in ("add", "subtract") and len(inst.operands) == 2:
        a, b = (_expr(comp, o, comps, env) for o in inst.operands)
        return ("op", op, a, b) if a is not None and b is not None else None
    if op == "compare" and len(inst.operands) == 2:
        a, b = (_expr(comp, o, comps, env) for o in inst.operands)
        return ("compare", (inst.attr("direction") or "").upper(), a, b)
    return None


def _fusion_kind(inst: Instruction) -> str:
    custom = re.search(r'"kind":"(__[\w]+)"', inst.attrs)
    if custom:
        return custom.group(1).strip("_")
    return inst.attr("kind") or "fusion"


__all__ = ["Array", "Computation", "Instruction", "Kernel", "Program", "dot_class", "parse_module", "parse_shape",
           "trip_count"]
