"""Static method checks: does the notebook compute a graded function the way the lab teaches?

A hidden check judges what a function returns. Some parts of a lab are about *how* it is
computed: lab04's Triton parts must run the student's own Triton kernels, lab07's
``gptq_quantize`` must be the blocked Cholesky algorithm. Everything inside the student's
kernel can be patched, so the evidence here is the notebook's source, read on the trusted
side (the grader builds the sanitized notebook itself). It is parsed with ``ast`` and never
executed.

A lab opts in with ``METHOD = {check_name: [rule, ...]}`` in ``autograder/checks/<lab>.py``,
or ``{check_name: ("function", [rule, ...])}`` when the check is not named after the
function it grades. A rule is made by one of the functions at the bottom of this file and
called as ``rule(code, function)``; it returns None or what the student should fix. ``method_verdicts(lab, nb)`` returns ``{check_name: message}`` for every check whose
rules fail; the grader scores those checks 0 with the message.

How the code is read:
- Each code cell goes through IPython's own input transformer (as the kernel does), so
  ``%time stmt`` becomes ``get_ipython().run_line_magic('time', 'stmt')``; the statement
  of ``%time``/``%timeit``/``%prun``/``%%capture`` is read as code, other magics are listed
  (``%run``, ``%%writefile``... fail ``no_dynamic_access``; ``!shell`` lines are allowed).
  A cell that does not parse is skipped (the kernel cannot run it either); when it defines
  the graded function the check fails with "could not read the code of X".
- The *binding table* lists what each module-level name may hold: a def, a class, an
  assigned expression, or an import with its dotted origin (``import torch.nn.functional
  as G`` binds G to "torch.nn.functional"). A name bound several times keeps every binding
  and the rules look at all of them.
- The *reachable code* of a function is its def plus, transitively, the defs, classes and
  assigned expressions of every module-level name it mentions. Names local to a function
  are not followed. Imported names end in their dotted origin: ``G.softmax`` reads as
  "torch.nn.functional.softmax", ``getattr(G, "softmax")`` too.
- Whatever would make that reading incomplete fails ``no_dynamic_access``: exec, eval,
  getattr with a computed name, globals(), ``__dict__``, importlib, names defined nowhere...

Limits: this reads names, not values. Host code that rebuilt e^x from + and * alone would
not be seen; the numeric checks and the in-kernel counters of ``autograder/cases`` (an extra,
early failure, never a reason to pass) are the other layers.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import fnmatch
import importlib
import re
from collections import defaultdict

from .notebook import cell_source

_BUILTINS = set(dir(builtins))
_BUILTIN = "<builtin>."                    # origin prefix of Python's builtins (print, getattr...)
_REFLECTIVE = {"eval", "exec", "compile", "__import__", "globals", "locals", "vars", "get_ipython"}
_REFLECTIVE_MODULES = ("importlib", "sys.modules", "builtins", "ctypes", "types", "gc",
                       "inspect", "marshal", "runpy", "code", "codeop", "imp",
                       "operator.attrgetter", "operator.methodcaller")
# anywhere in the notebook: what can swap code or intercept torch behind the reader's back
_NOTEBOOK_WIDE = ("importlib", "sys.modules", "sys.settrace", "sys.setprofile", "builtins", "ctypes",
                  "types.FunctionType", "types.CodeType", "types.ModuleType", "types.MethodType",
                  "marshal", "runpy", "gc.get_objects", "gc.get_referrers", "torch.overrides",
                  "torch.utils._python_dispatch", "torch._C", "torch.library", "torch._ops")
_DANGEROUS_DUNDERS = {"__dict__", "__code__", "__globals__", "__builtins__", "__closure__",
                      "__defaults__", "__kwdefaults__", "__subclasses__", "__getattribute__",
                      "__setattr__", "__func__", "__wrapped__", "__enter__", "__exit__"}
_MAY_SET = ("torch.backends.", "matplotlib.", "IPython.", "ipywidgets.", "warnings.", "logging.",
            "pandas.", "numpy.set_printoptions")  # settings a notebook may assign to
_PYTHON_MAGICS = {"time", "timeit", "prun", "capture"}     # their argument is Python code
_SAFE_MAGICS = {"matplotlib", "pip", "who", "whos", "pwd", "ls", "config", "pinfo", "pinfo2",
                "autoreload"}
_MAGIC_CALLS = {"run_line_magic", "run_cell_magic", "system", "getoutput"}


# --------------------------------------------------------------------------- reading cells
def _transform(src: str) -> str:
    """The Python the kernel runs for a cell (magics become get_ipython() calls)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(src)
    except Exception:  # no IPython here, or input it cannot split: strip magic lines ourselves
        return "\n".join(re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in src.split("\n"))


def _magic(call: ast.Call):
    """(kind, name, code) when ``call`` is get_ipython().run_line_magic(...) and the like."""
    f = call.func
    if not (isinstance(f, ast.Attribute) and f.attr in _MAGIC_CALLS and isinstance(f.value, ast.Call)
            and isinstance(f.value.func, ast.Name) and f.value.func.id == "get_ipython"):
        return None
    args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None
            for a in call.args]
    if f.attr in ("system", "getoutput"):
        return "shell", "!", None
    name = args[0] if args else None
    code = args[-1] if len(args) >= 2 else None
    if f.attr == "run_line_magic" and code is not None:
        code = re.sub(r"^(\s*-\w+(\s+\d+)?)*\s*", "", code)  # drop options: -n 3 -r 1 -o
    return "magic", name, code


@dataclasses.dataclass
class Binding:
    kind: str                  # "def", "class", "value" or "import"
    node: ast.AST | None = None
    origin: str | None = None  # for imports: the dotted name it stands for


@dataclasses.dataclass
class Uses:
    """What one piece of code mentions."""
    globals: set = dataclasses.field(default_factory=set)      # module-level names
    names: set = dataclasses.field(default_factory=set)        # dotted names; "?.attr" if unknown base
    calls: set = dataclasses.field(default_factory=set)        # dotted names of callees
    ops: set = dataclasses.field(default_factory=set)          # "@", "**"
    launches: set = dataclasses.field(default_factory=set)     # K in K[grid](...)
    dynamic: list = dataclasses.field(default_factory=list)    # (what, strong)
    undefined: set = dataclasses.field(default_factory=set)


def _chain(node):
    """(base Name, [attrs]) for a.b.c, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def _targets(node):
    """Names bound by an assignment target."""
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            yield from _targets(elt)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)


def _import_bindings(node):
    for a in node.names:
        if isinstance(node, ast.Import):
            yield (a.asname or a.name.split(".")[0]), (a.name if a.asname else a.name.split(".")[0])
        else:
            module = "." * node.level + (node.module or "")
            yield (a.asname or a.name), f"{module}.{a.name}"


def _bindings_of(stmt):
    """(name, Binding) for each name a statement binds in its own scope (not nested defs)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield stmt.name, Binding("def", stmt)
    elif isinstance(stmt, ast.ClassDef):
        yield stmt.name, Binding("class", stmt)
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        for name, origin in _import_bindings(stmt):
            yield name, Binding("import", stmt, origin)
    elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and stmt.value is not None:
        for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
            for name in _targets(t):
                yield name, Binding("value", stmt.value)
    elif isinstance(stmt, (ast.For, ast.AsyncFor)):
        for name in _targets(stmt.target):
            yield name, Binding("value", stmt.iter)
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        for item in stmt.items:
            for name in _targets(item.optional_vars) if item.optional_vars else ():
                yield name, Binding("value", item.context_expr)
    elif isinstance(stmt, ast.ExceptHandler) and stmt.name:
        yield stmt.name, Binding("value", stmt.type)
    elif isinstance(stmt, ast.NamedExpr):
        yield stmt.target.id, Binding("value", stmt.value)


_SCOPE = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
          ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _scope_walk(nodes):
    """Nodes of one scope: children, but not the insides of nested defs and lambdas."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPE):
            stack.extend(ast.iter_child_nodes(node))


# --------------------------------------------------------------------------- the notebook
class Code:
    """The code cells of a notebook: binding table, reachability, what each part uses."""

    def __init__(self, nb: dict):
        self.bindings = defaultdict(list)
        self.stars = []                        # modules imported with *
        self.unreadable = []                   # sources of cells that do not parse
        self.magics = []                       # (magic name, readable?)
        self.trees = []
        self._uses, self._reach = {}, {}
        for cell in nb.get("cells", []):
            if cell.get("cell_type") == "code":
                self._add(cell_source(cell))
        for tree in self.trees:                # module-level statements, and `global` names
            for node in _scope_walk(tree.body):
                self._bind_module(node)
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    declared = {n for s in _scope_walk(fn.body) if isinstance(s, ast.Global) for n in s.names}
                    for node in _scope_walk(fn.body):
                        for name, b in _bindings_of(node):
                            if name in declared:
                                self.bindings[name].append(b)

    def _add(self, src: str, depth: int = 0):
        try:
            tree = ast.parse(_transform(src) if depth == 0 else src)
        except (SyntaxError, ValueError):
            self.unreadable.append(src)
            return
        self.trees.append(tree)
        for node in ast.walk(tree):
            m = isinstance(node, ast.Call) and _magic(node)
            if m and m[0] == "magic":
                readable = m[1] in _PYTHON_MAGICS and m[2] is not None and depth < 3
                safe = m[1] in _SAFE_MAGICS or (m[1] == "load_ext" and (m[2] or "").strip() == "autoreload")
                self.magics.append((m[1], readable or safe))
                if readable:
                    self._add(m[2], depth + 1)

    def _bind_module(self, node):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            self.stars.append("." * node.level + (node.module or ""))
            return
        for name, b in _bindings_of(node):
            self.bindings[name].append(b)

    # --- names -----------------------------------------------------------------------
    def origins(self, name: str, seen=frozenset()) -> list[str]:
        """Dotted origins of a module-level name: imports, and aliases of imported names."""
        if name in seen:
            return []
        found = []
        for b in self.bindings.get(name, ()):
            if b.kind == "import":
                found.append(b.origin)
            elif b.kind == "value" and _chain(b.node):
                base, attrs = _chain(b.node)
                found += [".".join([o] + attrs) for o in self.origins(base, seen | {name})]
        if not self.bindings.get(name):
            if name in _BUILTINS:
                found.append(_BUILTIN + name)
            found += [f"{m}.{name}" for m in self.stars]
        return found

    def defined(self, name: str) -> bool:
        return bool(self.bindings.get(name)) or name in _BUILTINS or bool(self.stars)

    def definitions(self, name: str, seen=frozenset()) -> list[Binding]:
        """The defs/classes/values a name may hold, following plain aliases (a = b)."""
        out = []
        for b in self.bindings.get(name, ()):
            if b.kind == "value" and isinstance(b.node, ast.Name) and b.node.id not in seen \
                    and self.bindings.get(b.node.id):
                out += self.definitions(b.node.id, seen | {name})
            else:
                out.append(b)
        return out

    def is_jit(self, fn) -> bool:
        """A def decorated with triton.jit (under any alias), possibly inside autotune & co."""
        for d in getattr(fn, "decorator_list", ()):
            c = _chain(d.func if isinstance(d, ast.Call) else d)
            origins = [".".join([o] + c[1]) for o in self.origins(c[0])] if c else []
            if origins and all(o == "triton.jit" for o in origins):
                return True
        return False

    def uses(self, node) -> Uses:
        if id(node) not in self._uses:
            reader = _Reader(self)
            reader.visit(node)
            self._uses[id(node)] = reader.uses
        return self._uses[id(node)]

    def reachable(self, name: str):
        """[(name, binding, uses, is_jit)] of the code ``name`` may run, and the names seen."""
        if name not in self._reach:
            self._reach[name] = self._reachable(name)
        return self._reach[name]

    def _reachable(self, name: str):
        units, seen, todo = [], {name}, [name]
        while todo:
            n = todo.pop()
            for b in self.bindings.get(n, ()):
                if (b.kind == "import" and n != name) or b.node is None:  # imports: seen where used
                    continue
                u = Uses(names={b.origin}) if b.kind == "import" else self.uses(b.node)
                units.append((n, b, u, b.kind == "def" and self.is_jit(b.node)))
                for g in u.globals - seen:
                    seen.add(g)
                    todo.append(g)
        return units, seen

    def notebook_uses(self) -> list[Uses]:
        return [self.uses(tree) for tree in self.trees]


class _Reader(ast.NodeVisitor):
    """Collects the Uses of one def, class, expression or module, with Python's scoping."""

    def __init__(self, code: Code):
        self.code, self.uses, self.scopes = code, Uses(), []   # scopes: (kind, names, imports)

    # --- scopes ------------------------------------------------------------------------
    def _push(self, kind, body, extra=()):
        """Enter a scope whose local names are ``extra`` and what ``body`` binds."""
        names, imports, declared = set(extra), {}, set()
        for sub in _scope_walk(body):
            if isinstance(sub, ast.Global):
                declared |= set(sub.names)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                names.add(sub.id)
            for name, b in _bindings_of(sub):
                names.add(name)
                if b.kind == "import":
                    imports[name] = b.origin
        self.scopes.append((kind, names - declared, imports))

    def _lookup(self, name):
        """("local", origin or None) or ("global", None)."""
        for i, (kind, names, imports) in enumerate(reversed(self.scopes)):
            if kind == "class" and i > 0:
                continue
            if name in names:
                return "local", imports.get(name)
        return "global", None

    def _origins(self, name) -> list[str]:
        where, origin = self._lookup(name)
        if where == "local":
            return [origin] if origin else []
        self.uses.globals.add(name)
        if not self.code.defined(name):
            self.uses.undefined.add(name)
        return self.code.origins(name)

    def _dynamic(self, what, strong=False):
        self.uses.dynamic.append((what, strong))

    # --- definitions ------------------------------------------------------------------
    def visit_Module(self, node):
        self.generic_visit(node)

    def _args(self, args):
        return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs] + \
            [a.arg for a in (args.vararg, args.kwarg) if a]

    def visit_FunctionDef(self, node):
        a = node.args
        annotations = [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs
                       + [a.vararg, a.kwarg] if x and x.annotation] + [node.returns]
        for d in node.decorator_list + a.defaults + a.kw_defaults + annotations:
            if d:                               # evaluated where the def runs, not inside it
                self.visit(d)
        self._push("function", node.body, self._args(node.args))
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        for d in node.args.defaults + node.args.kw_defaults:
            if d:
                self.visit(d)
        self._push("function", [node.body], self._args(node.args))
        self.visit(node.body)
        self.scopes.pop()

    def visit_ClassDef(self, node):
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self._push("class", node.body)
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    def _comprehension(self, node, parts):
        self.visit(node.generators[0].iter)
        self._push("comp", [], [n for g in node.generators for n in _targets(g.target)])
        for g in node.generators:
            for x in ([g.iter] if g is not node.generators[0] else []) + g.ifs:
                self.visit(x)
        for p in parts:
            self.visit(p)
        self.scopes.pop()

    def visit_ListComp(self, node):
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node):
        self._comprehension(node, [node.key, node.value])

    def visit_Import(self, node):
        for name, origin in _import_bindings(node):
            self.uses.names.add(origin)

    visit_ImportFrom = visit_Import

    # --- names and attributes ----------------------------------------------------------
    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.uses.names.update(self._origins(node.id))
            if node.id in _REFLECTIVE and self._lookup(node.id)[0] == "global" \
                    and not self.code.bindings.get(node.id):
                self._dynamic(f"{node.id}()", strong=True)
        if node.id.startswith("__") and node.id != "__name__":
            self._dynamic(node.id, strong=True)

    def _attribute(self, value, attr, store=False):
        if attr.startswith("__") and attr.endswith("__") and attr != "__init__":
            self._dynamic(f".{attr}", strong=store or attr in _DANGEROUS_DUNDERS)
        c = _chain(value)
        if c:
            origins = [".".join([o] + c[1] + [attr]) for o in self._origins(c[0])]
            self.uses.names.update(origins)
            if not origins:
                self.uses.names.update(f"?.{a}" for a in c[1] + [attr])
            patched = [o for o in origins if not o.startswith(_MAY_SET)]
            if store and self._lookup(c[0])[0] == "global" and (patched or any(
                    b.kind in ("def", "class") for b in self.code.bindings.get(c[0], ()))):
                self._dynamic(f"an assignment to {'.'.join([c[0]] + c[1] + [attr])}", strong=True)
        else:
            self.uses.names.add(f"?.{attr}")
            self.visit(value)

    def visit_Attribute(self, node):
        self._attribute(node.value, node.attr, store=not isinstance(node.ctx, ast.Load))

    def visit_Call(self, node):
        m = _magic(node)
        if m:                                   # a magic: read by Code, nothing to follow here
            return
        c = _chain(node.func)
        callee = [".".join([o] + c[1]) for o in self._origins(c[0])] if c else []
        self.uses.calls.update(callee)
        if c and c[1] and not callee:
            self.uses.calls.add(f"?.{c[1][-1]}")
        special = {o[len(_BUILTIN):] for o in callee if o.startswith(_BUILTIN)}
        literal = len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
            and isinstance(node.args[1].value, str)
        if special & {"getattr", "hasattr", "setattr", "delattr"}:
            if not literal:
                self._dynamic(f"{sorted(special)[0]}() with a computed name",
                              strong=bool(special & {"setattr", "delattr"}))
            else:
                self._attribute(node.args[0], node.args[1].value,
                                store=bool(special & {"setattr", "delattr"}))
            for a in node.args[2:] + [k.value for k in node.keywords]:
                self.visit(a)
            return
        if isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            self.uses.launches.add(node.func.value.id)
        self.generic_visit(node)

    def visit_BinOp(self, node):
        self._op(node.op, node.right)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._op(node.op, node.value)
        self.generic_visit(node)

    def _op(self, op, right):
        if isinstance(op, ast.MatMult):
            self.uses.ops.add("@")
        if isinstance(op, ast.Pow):
            r = right.operand if isinstance(right, ast.UnaryOp) else right
            if not (isinstance(r, ast.Constant) and isinstance(r.value, (int, float))):
                self.uses.ops.add("**")


# --------------------------------------------------------------------------- rules
def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _hit(name: str, patterns) -> str | None:
    """The first pattern that ``name`` matches. ``name`` is dotted ("torch.softmax"),
    "?.attr" (an attribute of a value) or "<builtin>.pow". A dotted pattern matches by prefix
    ("torch.nn"); a word matches a module of that name ("importlib") or a name's last part
    ("softmax"); a glob matches the last part of an imported name ("*softmax*" matches
    torch._softmax, not ctx.softmax_scale). Words and globs never match ``math``'s scalar
    functions."""
    last = name.rsplit(".", 1)[-1]
    for p in patterns:
        if p in ("@", "**"):                  # operators, see Uses.ops
            continue
        if "." in p:
            if _under(name, p):
                return p
        elif not name.startswith("math."):
            glob = any(ch in p for ch in "*?[")
            if (fnmatch.fnmatchcase(last, p) and not (glob and name.startswith("?."))) \
                    or (not glob and _under(name, p)):
                return p
    return None


def _show(name: str) -> str:
    return name[2:] if name.startswith("?.") else name.replace(_BUILTIN, "")


def launches_triton_kernel(ops=("load", "store", "dot")):
    """Some reachable host code launches K[grid](...), K a notebook @triton.jit function
    (all its bindings) whose kernel code uses tl.load, tl.store and tl.dot; and no kernel
    code uses anything but triton and math."""
    def rule(code: Code, fn: str):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            bad = sorted(n for n in u.names | u.calls if jit and not n.startswith(
                ("triton.", "math.", _BUILTIN, "?.")) and n not in ("triton", "math"))
            if bad:
                return (f"the Triton kernel {name} uses {bad[0]}: a kernel may only use "
                        "triton.language (tl.*) and math")
        for name, b, u, jit in units:
            for k in u.launches:
                defs = code.definitions(k)
                if defs and all(d.kind == "def" and code.is_jit(d.node) for d in defs):
                    kernel_units, _ = code.reachable(k)
                    used = set().union(*(ku.names | ku.calls for _, _, ku, j in kernel_units if j))
                    if all(f"triton.language.{op}" in used for op in ops):
                        return None
        return (f"{fn} launches no Triton kernel of your own (a @triton.jit function that uses "
                f"{', '.join('tl.' + o for o in ops)}, called as kernel[grid](...)): the checks "
                "of the Triton parts need your kernel")
    return rule


def forbids(*patterns, why=""):
    """No reachable host code (outside @triton.jit) mentions a pattern: a dotted prefix
    ("torch.nn"), a glob on a name's last part ("*softmax*"), or "@" / "**" (a power
    with a computed exponent)."""
    def rule(code: Code, fn: str):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            if jit:
                continue
            for op in sorted(u.ops & set(patterns)):
                what = "the @ operator" if op == "@" else "** with a computed exponent"
                return f"{fn} uses {what} (in {name}){why}"
            for n in sorted(u.names | u.calls, key=lambda n: (-len(n), n)):  # the fullest name first
                if _hit(n, patterns):
                    return f"{fn} uses {_show(n)} (in {name}){why}"
        return None
    return rule


def no_dynamic_access():
    """Nothing that hides code from this reading: exec/eval/globals()/getattr with a
    computed name/__dict__/importlib/inspect/... in reachable code, names defined nowhere,
    and, anywhere in the notebook, what can rebind a name behind the reader's back
    (exec, setattr, assignments to attributes of modules or of notebook functions,
    %run and other magics that load code)."""
    def rule(code: Code, fn: str):
        for magic, ok in code.magics:
            if not ok:
                return (f"the notebook uses the magic %{magic}: graded code must be plain Python "
                        "in the notebook's cells")
        for u in code.notebook_uses():
            strong = [w for w, s in u.dynamic if s]
            strong += sorted(n for n in u.names if any(_under(n, m) for m in _NOTEBOOK_WIDE))
            if strong:
                return (f"the notebook uses {_show(strong[0])}, which can change code behind the "
                        f"grader's reading of {fn}: remove it")
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            found = [w for w, _ in u.dynamic] + sorted(n for n in u.names | u.calls
                                                       if any(_under(n, m) for m in _REFLECTIVE_MODULES))
            if found:
                return (f"{fn} uses {_show(found[0])} (in {name}): the grader reads your code and "
                        "needs plain calls and attribute names")
            if u.undefined:
                return (f"{fn} uses {sorted(u.undefined)[0]} (in {name}), which no def, class, "
                        "import or assignment of the notebook defines")
        return None
    return rule


def no_llmopt_imports(allowed=()):
    """Reachable code uses nothing from the course library but the ``allowed`` prefixes."""
    def rule(code: Code, fn: str):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            for n in sorted(u.names | u.calls):
                if _under(n.split(".")[0], "llmopt") and not any(_under(n, a) for a in allowed):
                    return (f"{fn} uses {n} from the course library (in {name}): this part asks "
                            "for your own implementation")
        return None
    return rule


def imports_only(*prefixes):
    """Every imported name reachable code uses comes from one of ``prefixes`` (or builtins)."""
    def rule(code: Code, fn: str):
        units, _ = code.reachable(fn)
        for name, b, u, jit in units:
            for n in sorted(u.names | u.calls):
                if not n.startswith(("?.", _BUILTIN)) and not any(_under(n, p) for p in prefixes):
                    return (f"{fn} uses {n} (in {name}): here the graded code may use only "
                            f"{', '.join(prefixes)} (and Python's builtins)")
        return None
    return rule


def calls(*names, what=""):
    """Some reachable code calls one of ``names`` (dotted; a method call .name counts)."""
    def rule(code: Code, fn: str):
        units, _ = code.reachable(fn)
        tails = {n.rsplit(".", 1)[-1] for n in names}
        for name, b, u, jit in units:
            if any(c in names or (c.startswith("?.") and c[2:] in tails) for c in u.calls):
                return None
        return f"{fn} never calls {what or ' or '.join(names)}"
    return rule


def does_not_reach(*names, why=""):
    """None of ``names`` (module-level names of the notebook) is reachable from the function."""
    def rule(code: Code, fn: str):
        _, seen = code.reachable(fn)
        for n in names:
            if n in seen and n != fn:
                return f"{fn} uses {n}{why}"
        return None
    return rule


# --------------------------------------------------------------------------- verdicts
def _defines(src: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+def|def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*=",
                     src, re.M) is not None


def verdicts(code: Code, method: dict) -> dict[str, str]:
    out = {}
    for check, spec in method.items():
        target, rules = spec if isinstance(spec, tuple) else (check, spec)
        if any(_defines(src, target) for src in code.unreadable):
            out[check] = (f"could not read the code of {target}: a cell that defines it has a "
                          "syntax error")
            continue
        if not code.bindings.get(target):
            out[check] = f"{target} is not defined in the notebook"
            continue
        for rule in rules:
            msg = rule(code, target)
            if msg:
                out[check] = msg
                break
    return out


def method_verdicts(lab: str, nb: dict) -> dict[str, str]:
    """{check_name: what is missing} for each check whose method requirement the notebook fails."""
    method = getattr(importlib.import_module(f"autograder.checks.{lab}"), "METHOD", None)
    if not method:
        return {}
    return verdicts(Code(nb), method)
