"""What the real TensorRT and CUDA runtime bindings offer, and which of their names our code uses.

Real TensorRT without importing it: the `tensorrt-cuXX-bindings` wheel holds the compiled binding
(`tensorrt_bindings/tensorrt.so`), which cannot be imported without libnvinfer. `tensorrt_api(wheel)` reads it as
an ELF file instead:
- `names`: every identifier string in `.rodata` that the code or a pointer refers to. pybind11 passes each class,
  method, property, argument and enum value name it registers as a pointer to such a string (x86-64: a RIP-relative
  `lea` in `.text`; the linker may store a string as the tail of a longer one, "Runtime" in "IRuntime\0"), so a
  name missing from this set is missing from that TensorRT. The set is flat: it says a name exists somewhere in
  the binding, not on which class (`inputs` exists as an argument name of add_concatenation).
- `docs`: {(class, member): docstring} from the symbols `tensorrt::<Class>Doc::<member>` (the binding's docstring
  table; pointers resolved through the relative relocations). It covers the documented methods the linker kept,
  not every member: it gives argument names (`:arg name:`) and return classes (`:returns: ... :class:`X``), and
  never decides alone whether a name exists.
- `module_names`: what the wheel's `tensorrt_bindings/__init__.py` adds in Python (`__version__`, `nptype`, ...).

Our uses are collected from source by `collect_uses(path)`, an abstract walk over the AST (no hand-written list):
- TensorRT roots: a name bound by `import tensorrt [as X]` or `X = import_tensorrt()`, and a parameter named
  `trt` (the convention our functions follow when they receive the module).
- cudart roots: a name bound by `from cuda.bindings import runtime as X` or `X = import_cudart(...)`, and a
  parameter named `cudart`.
- Values flow through assignments to names and to `self.<attr>` (one table per file; `a, b = x, y` element by
  element), both branches of `a if c else b`, arguments of calls to functions of the same file (and
  `self.<method>`) into their parameters, and those functions' return values back, until nothing changes.
- For TensorRT, every attribute read or call on a TensorRT value gives a TensorRT value: `trt.Builder(logger)` is
  an object of class Builder, a method's result an object of the class its docstring returns (else of unknown
  class), so `builder.create_network(...).get_input` is a TensorRT use too. A class deriving from a TensorRT
  class (our ILogger) uses each method it overrides, with its parameter names. `getattr(x, "NAME", default)` is
  an optional use (the code copes without it).
- For cudart, attribute chains on the module count (`rt.cudaError_t.cudaSuccess`, `rt.cudaMalloc(n)`), how many
  names a call's result is unpacked into, and attributes of the values so bound (`err, prop = rt.cudaGetDevice
  Properties(0)`; `prop.major` is an attribute of its second result), plus the names our
  `CudaDevice.call("cudaX", *args)` indirection passes as strings: the first argument of a `.call(...)` and the
  first item of a `("cudaX", args)` pair name a cudart function, called with the rest; any other string constant
  `cudaX` is a name use.
Each use records its file, line, the owner it was read from, and for calls the positional count and keywords.
"""

from __future__ import annotations

import ast
import builtins
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
DOC_SYMBOL = re.compile(r"_ZN8tensorrt(\d+)(\w+)E")
CUDA_NAME = re.compile(r"cuda[A-Z]\w*")
MODULE_SO = "tensorrt_bindings/tensorrt.so"
MODULE_INIT = "tensorrt_bindings/__init__.py"


# ---------------------------------------------------------------------------------------------- the real TensorRT

@dataclass
class TensorRTApi:
    version: str
    names: set
    docs: dict  # (class, member) -> docstring
    module_names: set = field(default_factory=set)

    def doc_args(self, cls: str, member: str) -> list | None:
        """The `:arg x:` names of cls.member's docstring, in order; None when it has no docstring entry."""
        doc = self.docs.get((cls, member))
        return None if doc is None else re.findall(r":arg (\w+):", doc)

    def returns(self, cls: str, member: str) -> str | None:
        """The class a method's docstring says it returns (`:returns: ... :class:`X``), or None."""
        m = re.search(r":returns:[^:]*?:class:`(\w+)`", self.docs.get((cls, member)) or "")
        return m.group(1) if m else None

    def args_by_member(self, member: str) -> list:
        """[(class, [arg names])] of every documented method called `member`."""
        return [(c, self.doc_args(c, m)) for (c, m) in self.docs if m == member]


def _elf_sections(data: bytes) -> dict:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    names_off = raw[names_index][4]
    sections = {}
    for i, (name, typ, _flags, addr, off, size, link, _info, _align, _ent) in enumerate(raw):
        sections[_cstr(data, names_off + name).decode()] = {"index": i, "type": typ, "addr": addr, "off": off,
                                                            "size": size, "link": link}
    return sections


def _cstr(data: bytes, off: int) -> bytes:
    return data[off:data.index(b"\0", off)]


def _referenced_identifiers(data: bytes, secs: dict, pointers: set) -> set:
    """Identifier strings of .rodata at an address that a RIP-relative `lea` of .text (REX.W 8D /r with mod 00,
    r/m 101: target = next instruction + disp32) or a relocated pointer holds."""
    text, ro = secs[".text"], secs[".rodata"]
    code = data[text["off"]: text["off"] + text["size"]]
    refs = set(pointers)
    for m in re.finditer(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", code):
        disp, = struct.unpack_from("<i", code, m.end())
        refs.add(text["addr"] + m.start() + 7 + disp)
    names = set()
    for addr in refs:
        if ro["addr"] <= addr < ro["addr"] + ro["size"]:
            off = ro["off"] + addr - ro["addr"]
            word = data[off: data.index(b"\0", off)]
            if IDENT.fullmatch(word):
                names.add(word.decode())
    return names


def tensorrt_api_from_so(data: bytes, version: str, init_source: str = "") -> TensorRTApi:
    """The names and docstring table of one tensorrt.so (see the module docstring)."""
    secs = _elf_sections(data)
    relative = {}  # R_X86_64_RELATIVE: address -> the address stored there at load time
    rela = secs.get(".rela.dyn")
    if rela:
        for off, info, addend in struct.iter_unpack("<QQq", data[rela["off"]: rela["off"] + rela["size"]]):
            if info & 0xFFFFFFFF == 8:
                relative[off] = addend
    names = _referenced_identifiers(data, secs, set(relative.values()))
    by_index = sorted(secs.values(), key=lambda s: s["index"])

    def file_offset(addr: int) -> int | None:
        for s in by_index:
            if s["addr"] and s["type"] != 8 and s["addr"] <= addr < s["addr"] + s["size"]:  # 8: NOBITS
                return s["off"] + addr - s["addr"]
        return None

    docs = {}
    symtab = secs.get(".symtab")
    if symtab:
        strtab = by_index[symtab["link"]]
        for name, info, _other, _shndx, value, _size in struct.iter_unpack(
                "<IBBHQQ", data[symtab["off"]: symtab["off"] + symtab["size"]]):
            if info & 0xF != 1:  # STT_OBJECT
                continue
            key = _doc_key(_cstr(data, strtab["off"] + name).decode(errors="replace"))
            target = relative.get(value)
            off = file_offset(target) if key and target else None
            if off is not None:
                docs[key] = _cstr(data, off).decode(errors="replace")
    module_names = set()
    if init_source:
        for node in ast.parse(init_source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                module_names.add(node.name)
            elif isinstance(node, ast.Assign):
                module_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return TensorRTApi(version, names, docs, module_names)


def _doc_key(symbol: str) -> tuple | None:
    """("IExecutionContext", "set_tensor_address") from _ZN8tensorrt20IExecutionContextDocL18set_tensor_addressE."""
    m = DOC_SYMBOL.match(symbol.split(".")[0])
    if not m:
        return None
    rest = m.group(1) + m.group(2)
    parts = []
    while rest and rest[0].isdigit():
        n = re.match(r"\d+", rest).group()
        rest = rest[len(n):]
        parts.append(rest[:int(n)])
        rest = rest[int(n):].lstrip("L")
    if len(parts) != 2 or not parts[0].endswith("Doc"):
        return None
    return parts[0][:-3], parts[1]


def tensorrt_api(wheel: Path) -> TensorRTApi:
    """The API of a downloaded `tensorrt-cuXX-bindings` wheel, read without importing it."""
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as z:
        return tensorrt_api_from_so(z.read(MODULE_SO), version, z.read(MODULE_INIT).decode())


# ---------------------------------------------------------------------------------------------- our uses

@dataclass(frozen=True)
class Use:
    api: str  # "tensorrt" or "cudart"
    owner: str  # "tensorrt" / "cudart" (the module), a dotted class path ("ILogger.Severity"), a class name, or "?"
    name: str
    where: str  # file:line
    call: tuple | None = None  # (positional count, keywords) when called
    optional: bool = False  # getattr(x, "NAME", default): the code copes without it
    override: tuple | None = None  # parameter names of our override of a TensorRT method
    unpack: int | None = None  # how many values a cudart call's result is unpacked into (None: not unpacked)

    def __str__(self):
        return f"{self.owner}.{self.name} ({self.where})"


MODULE, CLASS, OBJ = "module", "class", "obj"


class _Walker:
    """One file's abstract walk (see the module docstring)."""

    def __init__(self, path: Path, api: TensorRTApi | None):
        self.path, self.api = path, api
        self.tree = ast.parse(path.read_text(), str(path))
        self.funcs: dict = {}  # name -> FunctionDef (methods by their bare name too)
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.funcs.setdefault(node.name, node)
        self.params: dict = {}  # function name -> {param: value}
        self.returns: dict = {}  # function name -> value
        self.attrs: dict = {}  # "self.x" -> value
        self.uses: dict = {}
        self.changed = False

    # values: None (ours), ("module", "tensorrt"|"cudart"), ("class", "tensorrt", "A.B"), ("obj", "tensorrt", cls)
    def run(self) -> list:
        for _ in range(10):
            self.changed, self.uses = False, {}
            self._block(self.tree.body, {})
            if not self.changed:
                break
        return list(self.uses.values())

    def _set(self, table: dict, key, value) -> None:
        if value is not None and table.get(key) is None:
            table[key] = value
            self.changed = True

    def _use(self, node, api, owner, name, **kw) -> None:
        where = f"{self.path.name}:{node.lineno}"
        self.uses[(where, node.col_offset, name, owner)] = Use(api, owner, name, where, **kw)

    # -- statements
    def _block(self, body, env: dict) -> None:
        for stmt in body:
            self._stmt(stmt, env)

    def _stmt(self, node, env: dict) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._function(node, env)
        elif isinstance(node, ast.ClassDef):
            self._class(node, env)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt":
                    env[alias.asname or "tensorrt"] = (MODULE, "tensorrt")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if node.module == "cuda.bindings" and alias.name == "runtime":
                    env[alias.asname or "runtime"] = (MODULE, "cudart")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if isinstance(node.value, ast.Tuple) and all(isinstance(t, ast.Tuple) and len(t.elts) == len(
                    node.value.elts) for t in targets):  # a, b = x, y: element by element
                values = [self._expr(v, env) for v in node.value.elts]
                for target in targets:
                    for t, v, source in zip(target.elts, values, node.value.elts):
                        self._assign(t, v, env, source)
                return
            value = self._expr(node.value, env) if node.value is not None else None
            for target in targets:
                self._assign(target, value, env, node.value)
        elif isinstance(node, ast.Return) and node.value is not None:
            value = self._expr(node.value, env)
            if env.get("<function>"):
                self._set(self.returns, env["<function>"], value)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._stmt(child, env)
                elif isinstance(child, ast.expr):
                    self._expr(child, env)
                elif isinstance(child, (ast.excepthandler, ast.withitem, ast.match_case)):
                    for sub in ast.iter_child_nodes(child):
                        if isinstance(sub, ast.stmt):
                            self._stmt(sub, env)
                        elif isinstance(sub, ast.expr):
                            self._expr(sub, env)

    def _assign(self, target, value, env: dict, source) -> None:
        if isinstance(target, ast.Name):
            if value is not None or target.id not in env:
                env[target.id] = value if value is not None else env.get(target.id)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self._set(self.attrs, f"self.{target.attr}", value)
        elif isinstance(target, ast.Tuple) and isinstance(source, ast.Call):
            self._unpacked(source, target.elts, env)
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            self._expr(target.value, env)

    def _unpacked(self, call: ast.Call, targets: list, env: dict) -> None:
        """`err, prop = rt.cudaX(...)`: how many values the call's result is unpacked into; each name bound holds
        the i-th returned value (`prop.major` is then a use of attribute `major` of the type cudaX returns there)."""
        f = self._expr(call.func.value, env) if isinstance(call.func, ast.Attribute) else None
        if f == (MODULE, "cudart"):
            self._use(call, "cudart", "cudart", call.func.attr, call=self._arity(call), unpack=len(targets))
            for i, t in enumerate(targets):
                if isinstance(t, ast.Name):
                    env[t.id] = (OBJ, "cudart", f"{call.func.attr}[{i}]")

    def _function(self, node, outer: dict) -> None:
        env = {**outer, "<function>": node.name}  # closures see the names of the functions around them
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for a in args:
            if a.arg == "trt":
                env[a.arg] = (MODULE, "tensorrt")
            elif a.arg == "cudart":
                env[a.arg] = (MODULE, "cudart")
            elif self.params.get(node.name, {}).get(a.arg) is not None:
                env[a.arg] = self.params[node.name][a.arg]
        for d in node.args.defaults + node.args.kw_defaults:
            if d is not None:
                self._expr(d, env)
        self._block(node.body, env)

    def _class(self, node, env: dict) -> None:
        bases = [self._expr(b, env) for b in node.bases]
        for base in bases:
            if base is not None and base[0] == CLASS:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                        params = tuple(a.arg for a in item.args.args[1:])
                        self._use(item, base[1], base[2], item.name, override=params)
        for item in node.body:
            self._stmt(item, env)

    # -- expressions
    def _expr(self, node, env: dict):
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and f"self.{node.attr}" in self.attrs:
                return self.attrs[f"self.{node.attr}"]
            return self._attribute(node, self._expr(node.value, env), env)
        if isinstance(node, ast.Call):
            return self._call(node, env)
        if isinstance(node, ast.IfExp):
            self._expr(node.test, env)
            a, b = self._expr(node.body, env), self._expr(node.orelse, env)
            return a if a is not None else b
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and CUDA_NAME.fullmatch(node.value):
            self._use(node, "cudart", "cudart", node.value)
            return None
        if isinstance(node, ast.Tuple) and len(node.elts) == 2 and _cuda_name(node.elts[0]):
            rest = node.elts[1]
            n = len(rest.elts) if isinstance(rest, ast.Tuple) else 1
            self._use(node, "cudart", "cudart", node.elts[0].value, call=(n, ()))
            self._expr(rest, env)
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expr(child, env)
            elif isinstance(child, ast.comprehension):
                for sub in (child.target, child.iter, *child.ifs):
                    self._expr(sub, env)
        return None

    def _attribute(self, node: ast.Attribute, base, env: dict, call=None, optional=False):
        if base is None:
            return None
        kind, api = base[0], base[1]
        if kind == MODULE:
            self._use(node, api, api, node.attr, call=call, optional=optional)
            return (CLASS, api, node.attr)
        if api == "cudart":  # a chain on the module (rt.cudaError_t.cudaSuccess), or a returned value's attribute
            self._use(node, api, base[2], node.attr, call=call, optional=optional)
            return (CLASS, api, f"{base[2]}.{node.attr}") if kind == CLASS else None
        owner = base[2] or "?"
        self._use(node, api, owner, node.attr, call=call, optional=optional)
        if kind == CLASS:
            return (CLASS, api, f"{owner}.{node.attr}")
        return (OBJ, api, None)

    def _arity(self, node: ast.Call) -> tuple:
        return len(node.args), tuple(k.arg for k in node.keywords if k.arg)

    def _call(self, node: ast.Call, env: dict):
        values = [None if _cuda_name(a) else self._expr(a, env) for a in node.args]
        keywords = {k.arg: self._expr(k.value, env) for k in node.keywords}
        func = node.func
        arity = self._arity(node)
        # the first argument names a cudart function: CudaDevice.call("cudaX", *args)
        if isinstance(func, ast.Attribute) and func.attr == "call" and node.args and _cuda_name(node.args[0]):
            self._use(node, "cudart", "cudart", node.args[0].value, call=(arity[0] - 1, arity[1]))
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
            base = self._expr(node.args[0], env)
            if isinstance(node.args[1], ast.Constant) and base is not None:
                attr = ast.Attribute(value=node.args[0], attr=node.args[1].value, lineno=node.lineno,
                                     col_offset=node.col_offset)
                return self._attribute(attr, base, env, optional=len(node.args) == 3)
            return None
        if isinstance(func, ast.Name):
            if func.id in ("import_tensorrt", "import_cudart"):
                return (MODULE, "tensorrt" if func.id == "import_tensorrt" else "cudart")
            self._propagate(func.id, values, keywords)
            return self.returns.get(func.id)
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "self" and func.attr in self.funcs:
                self._propagate(func.attr, values, keywords, skip_self=True)
                return self.returns.get(func.attr)
            base = self._expr(func.value, env)
            if base is None:
                return None
            self._attribute(func, base, env, call=arity)
            if base[1] == "cudart":
                return None  # results of cudart calls are values, not the module
            if base[0] == MODULE:
                return (OBJ, "tensorrt", func.attr)  # trt.Builder(logger): an object of class Builder
            if base[0] == CLASS:
                return (OBJ, "tensorrt", None)
            cls = base[2]
            returned = self.api.returns(cls, func.attr) if (self.api and cls) else None
            return (OBJ, "tensorrt", returned)
        return self._expr(func, env)

    def _propagate(self, name: str, values: list, keywords: dict, skip_self: bool = False) -> None:
        """A call of a function of this file: what its arguments hold flows into its parameters."""
        f = self.funcs.get(name)
        if f is None:
            return
        params = [a.arg for a in f.args.posonlyargs + f.args.args][1 if skip_self else 0:]
        table = self.params.setdefault(name, {})
        for p, value in [*zip(params, values), *keywords.items()]:
            self._set(table, p, value)


def _cuda_name(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(CUDA_NAME.fullmatch(node.value))


def collect_uses(paths, api: TensorRTApi | None = None) -> list:
    """Every TensorRT and cudart use in the files at `paths` (see the module docstring). `api` types the results
    of documented TensorRT methods (their `:returns:` class)."""
    uses = []
    for p in paths:
        uses += _Walker(Path(p), api).run()
    return sorted(set(uses), key=lambda u: (u.where, u.owner, u.name))


# ---------------------------------------------------------------------------------------------- checks

def _accepts(call: tuple, args: list) -> bool:
    """Whether documented arguments `args` take `call` = (positional count, keywords)."""
    npos, keywords = call
    return npos <= len(args) and set(keywords) <= set(args[npos:])


def tensorrt_problems(uses, api: TensorRTApi) -> list:
    """One line per TensorRT use that this TensorRT does not have: a name missing from the binding, or a call /
    override whose arguments disagree with the member's `:arg` documentation (where it has one)."""
    problems = []
    for u in uses:
        if u.api != "tensorrt":
            continue
        module_level = u.owner == "tensorrt"
        known = u.name in api.names or (module_level and u.name in api.module_names)
        if not known:
            problems.append(f"{u}: TensorRT {api.version} has no {u.name!r}" + (" (optional: the code copes)"
                                                                                  if u.optional else ""))
            continue
        cls = u.owner.split(".")[-1]
        if u.call is not None:
            if module_level:  # a class called: its constructor's arguments are in the class docstring
                documented = [(u.name, api.doc_args(u.name, "descr"))]
            elif u.owner != "?":
                documented = [(cls, api.doc_args(cls, u.name))]
            else:
                documented = api.args_by_member(u.name)
            documented = [(c, a) for c, a in documented if a]
            if documented and not any(_accepts(u.call, a) for _, a in documented):
                docs = ", ".join(f"{c}.{u.name}({a})" for c, a in documented)
                problems.append(f"{u}: called with {u.call[0]} positional and keywords {list(u.call[1])}, but "
                                f"TensorRT {api.version} documents {docs}")
        if u.override is not None:
            args = api.doc_args(cls, u.name)
            if args and tuple(args) != u.override:
                problems.append(f"{u}: our override takes {u.override}, TensorRT {api.version} passes {tuple(args)}")
    return problems


def returns_types(fn) -> list:
    """The type of each value a cuda-bindings function returns, from its numpydoc `Returns` section
    ("cudaError_t", "prop : :py:obj:`~.cudaDeviceProp`", "count : int"); [] when it has none."""
    doc = getattr(fn, "__doc__", None) or ""
    start = doc.find("Returns\n-------\n")
    if start < 0:
        return []
    section = re.split(r"\n[^\n]+\n-{3,}\n", doc[start + 16:])[0]  # up to the next numpydoc header
    lines = [line for line in section.splitlines() if line and not line[0].isspace()]
    return [re.sub(r":py:obj:`~\.|`", "", line.split(" : ")[-1]).split(".")[0].strip() for line in lines]


def returns_count(fn) -> int | None:
    """How many values a cuda-bindings function returns, or None when its docstring does not say."""
    return len(returns_types(fn)) or None


def cudart_problems(uses, cudart) -> list:
    """One line per cudart use that the installed cuda-bindings runtime does not have: a missing name, a call its
    signature refuses, or a result unpacked into another number of values than it returns."""
    import inspect

    problems = []
    for u in uses:
        if u.api != "cudart":
            continue
        returned = re.fullmatch(r"(\w+)\[(\d+)\]", u.owner)
        if returned:  # an attribute of the i-th value cudaX returns: of the type its docstring gives, if it can say
            types = returns_types(getattr(cudart, returned.group(1), None))
            i = int(returned.group(2))
            kind = types[i] if i < len(types) else None
            owner = getattr(cudart, kind, None) or getattr(builtins, kind, None) if kind else None
            if owner is None:
                continue
        else:
            owner = cudart
            for part in ([] if u.owner == "cudart" else u.owner.split(".")):
                owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, u.name):
            problems.append(f"{u}: cuda.bindings.runtime has no {u.owner}.{u.name}")
            continue
        fn = getattr(owner, u.name)
        if u.call is not None and not returned:  # a returned value's methods are bound: no signature to bind
            npos, keywords = u.call
            try:
                inspect.signature(fn).bind(*range(npos), **{k: None for k in keywords})
            except TypeError as e:
                problems.append(f"{u}: called with {npos} positional and keywords {list(keywords)}: {e}")
            except ValueError:
                pass  # no signature to check against
        if u.unpack is not None and returns_count(fn) not in (None, u.unpack):
            problems.append(f"{u}: unpacked into {u.unpack} values, it returns {returns_count(fn)}")
    return problems
