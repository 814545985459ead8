"""One-line swap of a Hugging Face `transformers` causal LM's loss for the fused linear
cross-entropy, so training never materialises the (batch, time, vocab) logits.

    import softmax_ce.integrations.transformers as sce_hf
    model = AutoModelForCausalLM.from_config(config)
    sce_hf.apply(model)                        # raises if it cannot reproduce the loss
    out = model(input_ids, labels=labels)      # out.loss as before, out.logits is None
    sce_hf.check(model)                        # stock against patched on a random batch

How: the model's own forward runs unchanged (so every family's attention, masks,
caches and options keep working), except that its output head hands back the hidden
states it was given instead of the logits, and that the loss it would take of them is
not computed: a model whose loss is transformers' `ForCausalLMLoss` runs with its labels
(some use them before the head, e.g. for masks) and a `loss_function` that computes
nothing; one that takes a plain `CrossEntropyLoss` runs without labels, which apply()
has checked are used for nothing else.  The loss is then `linear_cross_entropy` of
those hidden states with the head's weight and bias, in fp32.

What that loss must be is read, once, in `apply`, from the source of the model's
forward (and of the modules and functions it calls on the logits): what happens to
the logits between the head and the loss (scales such as Cohere's `logit_scale` or
Granite's `logits_scaling`, softcaps such as Gemma's `final_logit_softcapping`, in any
order that folds into "scale the hidden states, then softcap"), which loss is taken
(transformers' `ForCausalLMLoss` - shifted, `num_items_in_batch`, `shift_labels`,
`ignore_index` - or a plain unshifted `CrossEntropyLoss`), and what is added to it (a
mixture-of-experts router's `coef * aux_loss`).  The values (the scale, the cap, the
coefficient, the conditions around them) are the model's own expressions, evaluated
at every call, so a config changed after `apply` is followed.  Anything else found
on that path (a slice of the logits, a loss of the model's own, a head with a forward
of its own, ...) makes `apply` raise `UnsupportedModelError`
naming the model type and the source line; a condition that can only be decided at
call time (on the sequence length, say) raises there.  A silent difference from the
stock loss is the one outcome this module is built to exclude.  The loss is fp32, as
transformers' own (which upcasts the logits), also for bf16 models.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import textwrap
import zlib
from typing import Any, Optional

import torch

from ..linear import linear_cross_entropy


_ORIGINAL = "_softmax_ce_original_forward"
_PLAN = "_softmax_ce_plan"
IGNORE_INDEX = -100
_MAX_DEPTH = 6  # nested modules / functions followed from the forward to the head

__all__ = ["apply", "revert", "check", "explain", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """`apply` cannot reproduce this model's loss exactly, so it leaves the model alone."""


def _api_error(model, reason, cls=UnsupportedModelError):
    """The error apply() raises (or a patched call, for a condition known only then);
    its `reason` attribute is the reason alone."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cls is UnsupportedModelError:
        tail = "; its loss is left to transformers (call the model without apply())"
    else:
        tail = "; this call's loss is left to transformers (revert(model) to run it)"
    err = cls(f"softmax_ce.integrations.transformers.apply: {type(model).__name__} "
              f"(model_type {model_type!r}): {reason}{tail}")
    err.reason = reason
    return err


# --------------------------------------------------------------------------------------
# Abstract values of the forward's variables, after the head
# --------------------------------------------------------------------------------------

class _Ctx:
    """What a Static expression may look at when evaluated: the logits' metadata (a
    _Meta: shape, dtype, device; in apply() the batch and time sizes are None), or None
    when there is none."""

    def __init__(self, logits_meta=None):
        self.logits_meta = logits_meta


class _Unknown(Exception):
    """A Static value that cannot be evaluated now (in apply(), one that needs the
    logits' shape)."""


class _Static:
    """A value the forward computes from `self`, the config, constants and globals only:
    evaluated (again) at every call.  `src` identifies it for comparisons."""

    def __init__(self, fn, src):
        self.fn, self.src = fn, src

    def __call__(self, ctx):
        return self.fn(ctx)


def _const(value, src=None):
    return _Static(lambda ctx: value, src if src is not None else repr(value))


class _Runtime:
    """A value that depends on the call's inputs (hidden states, masks, kwargs, ...)."""


RUNTIME = _Runtime()


class _Kwargs(_Runtime):
    """The forward's **kwargs (where transformers passes num_items_in_batch,
    shift_labels, ...)."""

    def __init__(self):
        self.mutated = None


@dataclasses.dataclass(frozen=True)
class _Labels:
    """The labels argument (possibly moved to another device)."""


LABELS = _Labels()


@dataclasses.dataclass(frozen=True)
class _Logits:
    """The head's output after `ops`: ("mul", Static) | ("div", Static) | ("tanh",) |
    ("cond", Static guard, ops if true, ops if false).  `flat`: viewed as (N, V)."""

    ops: tuple = ()
    flat: Optional[_Static] = None

    def then(self, *op):
        return _Logits(self.ops + (op,), self.flat)


@dataclasses.dataclass(frozen=True)
class _Tainted:
    """Derived from the logits by an operation this module does not reproduce."""

    reason: str


@dataclasses.dataclass(frozen=True)
class _Bad:
    """An unsupported loss (or returned value): apply() refuses, or the call raises."""

    reason: str


@dataclasses.dataclass(frozen=True)
class _Loss:
    """A loss that linear_cross_entropy reproduces.
    kind: "causal" (transformers' ForCausalLMLoss) or "plain" (CrossEntropyLoss on the
    flattened logits, unshifted).  check: Static that must be truthy at call time (the
    loss function is still ForCausalLMLoss).  vocab: the vocabulary size the stock loss
    views the logits with.  options: (name, Static) pairs (ignore_index, reduction, ...);
    kwargs: the forward's **kwargs are passed to the loss.  aux: (variable, coefficient
    Static) pairs of `loss += coef * aux_loss`, the variable being the model output's
    aux_loss."""

    kind: str
    logits: _Logits
    vocab: Optional[_Static]
    options: tuple = ()
    kwargs: bool = False
    check: Optional[_Static] = None
    aux: tuple = ()

    def key(self):
        return (self.kind, _ops_key(self.logits.ops), _src(self.vocab),
                tuple((k, _src(v)) for k, v in self.options), self.kwargs, _src(self.check))


@dataclasses.dataclass(frozen=True)
class _Cond:
    """`a if guard else b`, decided at call time."""

    guard: _Static
    a: Any
    b: Any


def _src(s):
    return None if s is None else s.src


def _ops_key(ops):
    out = []
    for op in ops:
        if op[0] == "cond":
            out.append(("cond", op[1].src, _ops_key(op[2]), _ops_key(op[3])))
        elif op[0] == "tanh":
            out.append(("tanh",))
        else:
            out.append((op[0], op[1].src))
    return tuple(out)


def _same(a, b):
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, _Static):
        return a.src == b.src
    if isinstance(a, _Logits):
        return _ops_key(a.ops) == _ops_key(b.ops) and _src(a.flat) == _src(b.flat)
    if isinstance(a, _Loss):
        return a.key() == b.key() and _aux_key(a) == _aux_key(b)
    if isinstance(a, _Cond):
        return a.guard.src == b.guard.src and _same(a.a, b.a) and _same(a.b, b.b)
    if isinstance(a, _Runtime):
        return True
    return a == b


def _aux_key(loss):
    return [(name, c.src) for name, c in loss.aux]


def _merge_runtime(a, b, why, env_a=None, env_b=None):
    """The value of a variable after an `if` whose condition is only known at run time
    (env_a, env_b: the variables after each branch)."""
    if _same(a, b):
        return a
    if isinstance(a, _Loss) and isinstance(b, _Loss) and a.key() == b.key() and \
            env_a is not None:
        # `if output_router_logits: aux_loss = ...; loss += coef * aux_loss`: the term is
        # added exactly when aux_loss is not None, which the model's output tells, if the
        # other branch leaves aux_loss None
        union = list(a.aux)
        for term in b.aux:
            if term not in union:
                union.append(term)
        for loss, env, other in ((a, env_a, b), (b, env_b, a)):
            for name, c in other.aux:
                if (name, c) in loss.aux:
                    continue
                v = env.get(name)
                if not (isinstance(v, _Static) and _Interp.now(v) is None):
                    return _Bad(f"it adds `{c.src.split(' | ')[0]} * {name}` under a "
                                f"run-time condition ({why}) that its output does not tell")
        return dataclasses.replace(a, aux=tuple(union))
    if isinstance(a, (_Runtime, _Static)) and isinstance(b, (_Runtime, _Static)):
        return RUNTIME
    if isinstance(a, _Tainted) or isinstance(b, _Tainted):
        return a if isinstance(a, _Tainted) else b
    return _Bad(f"its loss depends on a run-time condition ({why})")


def _relevant(v):
    """Values whose merging matters (anything derived from the logits or the loss)."""
    return isinstance(v, (_Logits, _Loss, _Tainted, _Bad, _Cond, _Ret))


# --------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------

class _Refuse(Exception):
    pass


class _Return(Exception):
    def __init__(self, value):
        self.value = value


def _unwrap(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return getattr(fn, "__func__", fn)


def _parse(fn):
    fn = _unwrap(fn)
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise _Refuse(f"the source of {getattr(fn, '__qualname__', fn)} is not available "
                      f"({e})") from None
    tree = ast.parse(src)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise _Refuse(f"{fn!r} is not a plain function")
    return fn, node


def _line(node):
    try:
        return ast.unparse(node).split("\n")[0][:160]
    except Exception:  # pragma: no cover
        return type(node).__name__


def _names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


_META_ATTRS = {"shape", "dtype", "device", "ndim"}
_META_METHODS = {"size", "dim"}


@dataclasses.dataclass(frozen=True)
class _Ret:
    """A ModelOutput being built (`return SomeOutput(loss=..., ...)`): its loss."""

    loss: Any


class _Raises:
    """A path on which the forward raises: the stock model fails there too."""


RAISES = _Raises()


def _normalise(tree):
    """The loss tree with every leaf a _Loss or a _Bad."""
    if isinstance(tree, _Cond):
        return _Cond(tree.guard, _normalise(tree.a), _normalise(tree.b))
    if isinstance(tree, (_Loss, _Bad)):
        return tree
    if isinstance(tree, _Tainted):
        return _Bad(f"its loss is not one this module reproduces ({tree.reason})")
    return _Bad(f"its loss is not one this module reproduces ({type(tree).__name__})")


class _Interp:
    """Abstract interpretation of one function body (the model's forward, or a module's
    forward / a function that the head's output passes through)."""

    def __init__(self, analysis, fn, bindings, depth):
        self.an, self.fn, self.depth = analysis, fn, depth
        self.globals = getattr(fn, "__globals__", {})
        self.env = dict(bindings)

    # ----- helpers ---------------------------------------------------------------------

    def lookup(self, name):
        if name in self.env:
            return self.env[name]
        if name in self.globals:
            return _const(self.globals[name], f"{self.globals.get('__name__')}.{name}")
        import builtins

        if hasattr(builtins, name):
            return _const(getattr(builtins, name), name)
        return RUNTIME

    def static_expr(self, node):
        """node as a Static if every name in it is static (or the logits' metadata)."""
        for n in ast.walk(node):
            if isinstance(n, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                              ast.GeneratorExp, ast.NamedExpr, ast.Await, ast.Yield,
                              ast.Starred)):
                return None
        deps = {}
        for name in _names(node):
            v = self.lookup(name)
            if isinstance(v, _Static):
                deps[name] = v
            elif isinstance(v, _Logits) and not v.ops and self._meta_only(node, name):
                deps[name] = None  # the logits' metadata
            elif isinstance(v, _Logits) and self._meta_only(node, name):
                deps[name] = None  # scales and softcaps keep shape, dtype and device
            else:
                return None
        code = compile(ast.Expression(body=node), "<softmax_ce>", "eval")
        glb = self.globals

        def fn(ctx):
            ns = {}
            for k, v in deps.items():
                if v is None:
                    if ctx.logits_meta is None:
                        raise _Unknown(k)
                    ns[k] = ctx.logits_meta
                else:
                    ns[k] = v(ctx)
            return eval(code, glb, ns)  # the library's own expression, on its own model

        dep_src = tuple(sorted((k, "meta" if v is None else v.src) for k, v in deps.items()))
        return _Static(fn, f"{_line(node)} | {dep_src}")

    @staticmethod
    def _meta_only(node, name):
        """`name` appears only as name.shape / .dtype / .device / .size(...) in node."""
        parents = {}
        for p in ast.walk(node):
            for c in ast.iter_child_nodes(p):
                parents[c] = p
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id == name:
                p = parents.get(n)
                if not (isinstance(p, ast.Attribute) and p.value is n
                        and (p.attr in _META_ATTRS or p.attr in _META_METHODS)):
                    return False
        return True

    @staticmethod
    def now(static):
        """Evaluate a Static in apply(): callees (is this the head? torch.tanh?)."""
        try:
            return static(_Ctx())
        except Exception:
            return _Unknown

    def _walrus(self, node):
        """Bind the walrus targets in node; return node with each `(x := e)` as `x`."""
        an = self

        class Strip(ast.NodeTransformer):
            def visit_NamedExpr(self, n):
                an.env[n.target.id] = an.expr(n.value)
                return ast.copy_location(ast.Name(id=n.target.id, ctx=ast.Load()), n)

        return ast.fix_missing_locations(Strip().visit(copy.deepcopy(node)))

    # ----- statements ------------------------------------------------------------------

    def run(self, stmts):
        """Run a statement list; raises _Return when the path returns."""
        stmts = list(stmts)
        for i, st in enumerate(stmts):
            if isinstance(st, ast.If) and any(isinstance(n, (ast.Return, ast.Raise))
                                              for n in ast.walk(st)):
                # a branch returns: follow each branch with the rest of the body
                rest = stmts[i + 1:]
                self.if_(st, st.body + rest, st.orelse + rest, split=True)
                return
            self.stmt(st)

    def stmt(self, st):
        if isinstance(st, ast.Expr):
            if isinstance(st.value, ast.Constant):
                return  # docstring
            self.expr(st.value)
            self._side_effect(st.value)
            return
        if isinstance(st, (ast.Assign, ast.AnnAssign)):
            if st.value is None:
                return
            v = self.expr(st.value)
            for t in (st.targets if isinstance(st, ast.Assign) else [st.target]):
                self.assign(t, v, st)
            return
        if isinstance(st, ast.AugAssign):
            self.augassign(st)
            return
        if isinstance(st, ast.If):
            self.if_(st, st.body, st.orelse, split=False)
            return
        if isinstance(st, ast.Return):
            raise _Return(self.expr(st.value) if st.value is not None else _const(None))
        if isinstance(st, ast.Raise):
            raise _Return(RAISES)
        if isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                self.expr(item.context_expr)
            self.run(st.body)
            return
        if isinstance(st, (ast.Pass, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal,
                           ast.Assert)):
            return
        # loops, try, match, nested defs, del: harmless unless they touch logits or loss
        for name in _names(st):
            v = self.lookup(name)
            if _relevant(v):
                self.env[name] = _Tainted(f"`{_line(st)}` ({type(st).__name__.lower()} "
                                          f"statement)")
            elif isinstance(v, _Labels):
                self.an.labels_misuse(st)
        for n in ast.walk(st):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                if not _relevant(self.lookup(n.id)):
                    self.env[n.id] = RUNTIME

    def _side_effect(self, value):
        # an expression whose value is dropped but that sees the logits or the loss
        # (logits.mul_(s), fill(logits)) is there for what it does to them
        if any(_relevant(self.lookup(n)) for n in _names(value)):
            self.mutated(f"`{_line(value)}` may change it in place")

    def mutated(self, reason):
        """Something derived from the logits may have changed in place: every such
        variable (views and aliases share the storage) is no longer reproduced."""
        for k, v in list(self.env.items()):
            if _relevant(v):
                self.env[k] = _Tainted(reason)

    def assign(self, target, v, st):
        if isinstance(target, ast.Name):
            self.env[target.id] = v
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.assign(t, _Tainted(f"unpacked from `{_line(st)}`") if _relevant(v)
                            else RUNTIME, st)
            return
        # item or attribute assignment: logits[...] = ..., kwargs["x"] = ...
        base = target
        while isinstance(base, (ast.Subscript, ast.Attribute, ast.Starred)):
            base = base.value
        if isinstance(base, ast.Name):
            bv = self.lookup(base.id)
            if _relevant(bv):
                self.env[base.id] = _Tainted(f"changed in place by `{_line(st)}`")
            if isinstance(bv, _Kwargs):
                bv.mutated = _line(st)
            if isinstance(bv, _Labels):
                self.an.labels_misuse(st)

    def augassign(self, st):
        t = st.target
        if not isinstance(t, ast.Name):
            self.assign(t, RUNTIME, st)
            return
        cur = self.lookup(t.id)
        if isinstance(cur, _Loss) and isinstance(st.op, ast.Add):
            term = self._aux_term(st.value)
            if term is not None:
                self.env[t.id] = dataclasses.replace(cur, aux=cur.aux + (term,))
                return
        if isinstance(cur, _Kwargs):
            cur.mutated = _line(st)
        new = self.expr(ast.BinOp(left=ast.Name(id=t.id, ctx=ast.Load()), op=st.op,
                                  right=st.value))
        if _relevant(cur):  # `logits *= s` is in place: other views of it change too
            self.mutated(f"`{_line(st)}` changes it in place")
        self.env[t.id] = new

    def _aux_term(self, node):
        """`coef * aux_loss` or `coef * aux_loss.to(device)`, coef static."""
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
            return None
        for coef, aux in ((node.left, node.right), (node.right, node.left)):
            if (isinstance(aux, ast.Call) and isinstance(aux.func, ast.Attribute)
                    and aux.func.attr == "to"):
                aux = aux.func.value
            if isinstance(aux, ast.Name) and isinstance(self.lookup(aux.id), _Runtime):
                c = self.static_expr(coef)
                if c is not None:
                    return aux.id, c
        return None

    def if_(self, st, body, orelse, split):
        decided = self.an.decide(st.test, self)
        if decided is None:
            test = self._walrus(st.test)
            guard = None if self._mentions_labels(test) else self.static_expr(test)
            if guard is None:
                self.expr(test)  # labels in a condition: a use of the labels
        before = dict(self.env)
        results = []
        for branch in ([body] if decided is True else [orelse] if decided is False
                       else [body, orelse]):
            self.env = dict(before)
            try:
                self.run(branch)
                results.append(("env", self.env))
            except _Return as r:
                results.append(("ret", r.value))
        if decided is not None:
            kind, v = results[0]
            if kind == "ret":
                raise _Return(v)
            self.env = v
            return
        (ka, a), (kb, b) = results
        if split or ka == "ret" or kb == "ret":
            if ka != "ret" or kb != "ret":
                if not split:
                    # a branch returns and the other goes on: only harmless when the
                    # returning one raises (then the other is the only live path)
                    if ka == "ret" and a is RAISES:
                        self.env = b
                        return
                    if kb == "ret" and b is RAISES:
                        self.env = a
                        return
                raise _Return(_Bad(f"the forward's flow around `{_line(st.test)}` is not "
                                   f"one this module follows"))
            raise _Return(self.join(guard, a, b, st.test))
        env = {}
        for k in set(a) | set(b):
            va, vb = a.get(k, self.lookup(k)), b.get(k, self.lookup(k))
            if guard is None and isinstance(va, _Loss) and isinstance(vb, _Loss):
                env[k] = _merge_runtime(va, vb, _line(st.test), a, b)
            else:
                env[k] = self.join(guard, va, vb, st.test)
        self.env = env

    def _mentions_labels(self, node):
        return any(isinstance(self.lookup(n), _Labels) for n in _names(node))

    @staticmethod
    def join(guard, a, b, test):
        """The value of a variable after `if test` (guard: the test as a Static, or None
        when it depends on the call's inputs)."""
        if a is RAISES:
            return b
        if b is RAISES:
            return a
        if _same(a, b):
            return a
        if isinstance(a, _Ret) and isinstance(b, _Ret):
            return _Ret(_Interp.join(guard, a.loss, b.loss, test))
        if guard is None:
            return _merge_runtime(a, b, _line(test) if test is not None else "")
        if isinstance(a, _Logits) and isinstance(b, _Logits) and _same(a.flat, b.flat):
            common = 0
            while (common < min(len(a.ops), len(b.ops))
                   and _ops_key(a.ops[common:common + 1]) == _ops_key(b.ops[common:common + 1])):
                common += 1
            return _Logits(a.ops[:common] + (("cond", guard, a.ops[common:],
                                              b.ops[common:]),), a.flat)
        if isinstance(a, _Static) and isinstance(b, _Static):
            return _Static(lambda ctx: a(ctx) if guard(ctx) else b(ctx),
                           f"({a.src} if {guard.src} else {b.src})")
        if not _relevant(a) and not _relevant(b):
            return RUNTIME
        return _Cond(guard, a, b)

    # ----- expressions -----------------------------------------------------------------

    def expr(self, node):
        if node is None:
            return _const(None)
        if not isinstance(node, ast.Name):
            # a variable that holds one of two values (decided at call time): evaluate the
            # expression for each
            for name in sorted(_names(node)):
                v = self.env.get(name)
                if isinstance(v, _Cond):
                    self.env[name] = v.a
                    a = self.expr(node)
                    self.env[name] = v.b
                    b = self.expr(node)
                    self.env[name] = v
                    return self.join(v.guard, a, b, None)
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Constant):
            return _const(node.value)
        if isinstance(node, ast.NamedExpr):
            v = self.expr(node.value)
            self.env[node.target.id] = v
            return v
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value)
            if isinstance(base, _Logits):
                if node.attr in _META_ATTRS:
                    return self._static_or_runtime(node)
                return _Tainted(f"`{_line(node)}`")
            if isinstance(base, _Labels):
                self.an.labels_misuse(node)
                return RUNTIME
            if _relevant(base):
                return _Tainted(f"`{_line(node)}`")
            return self._static_or_runtime(node)
        if isinstance(node, ast.IfExp):
            decided = self.an.decide(node.test, self)
            if decided is True:
                return self.expr(node.body)
            if decided is False:
                return self.expr(node.orelse)
            test = self._walrus(node.test)
            guard = None if self._mentions_labels(test) else self.static_expr(test)
            if guard is None:
                self.expr(test)
            return self.join(guard, self.expr(node.body), self.expr(node.orelse), node.test)
        # everything else: comparisons, subscripts, tuples, comprehensions ...
        if self.an.is_labels_test(node, self):
            return RUNTIME
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child)  # nested calls: heads, labels, kwargs
        vals = [self.lookup(n) for n in _names(node)]
        if any(isinstance(v, _Labels) for v in vals):
            self.an.labels_misuse(node)
            return RUNTIME
        if any(_relevant(v) for v in vals):
            s = self.static_expr(node)
            if s is not None:
                return s  # e.g. logits.shape[1] < n
            return _Tainted(f"`{_line(node)}`")
        return self._static_or_runtime(node)

    def _static_or_runtime(self, node):
        s = self.static_expr(node)
        return s if s is not None else RUNTIME

    def binop(self, node):
        left, right = self.expr(node.left), self.expr(node.right)
        op = node.op
        if isinstance(left, _Logits) and isinstance(right, _Static):
            if isinstance(op, ast.Mult):
                return left.then("mul", right)
            if isinstance(op, ast.Div):
                return left.then("div", right)
        if isinstance(right, _Logits) and isinstance(left, _Static) and isinstance(op, ast.Mult):
            return right.then("mul", left)
        if any(isinstance(v, _Labels) for v in (left, right)):
            self.an.labels_misuse(node)
            return RUNTIME
        if any(_relevant(v) for v in (left, right)):
            return _Tainted(f"`{_line(node)}`")
        return self._static_or_runtime(node)

    def call(self, node):
        func = node.func
        if isinstance(func, ast.Attribute):
            base = self.expr(func.value)
            if _relevant(base) and (func.attr.endswith("_") and not func.attr.startswith("_")):
                self._args(node)
                self.mutated(f"`{_line(node)}` changes it in place")
                return _Tainted(f"`{_line(node)}`")
            if isinstance(base, _Logits):
                return self._logits_method(base, func.attr, node)
            if isinstance(base, _Labels):
                if func.attr in ("to", "contiguous", "long") or (
                        func.attr in ("view", "reshape") and self._static_args(node)):
                    self._args(node)
                    return LABELS
                self.an.labels_misuse(node)
                return RUNTIME
            if isinstance(base, _Kwargs) and func.attr not in ("get", "keys", "items",
                                                               "values", "copy"):
                base.mutated = _line(node)
            if _relevant(base):
                self._args(node)
                return _Tainted(f"`{_line(node)}`")
            callee = self._static_or_runtime(func)
        else:
            callee = self.expr(func)
        args = self._args(node)
        return self._call_with(callee, node, args)

    def _call_with(self, callee, node, args):
        pos, kw, star = args
        # a conditional argument (logits softcapped or not): one call per case
        for i, v in enumerate(pos):
            if isinstance(v, _Cond):
                a = self._call_with(callee, node, (pos[:i] + [v.a] + pos[i + 1:], kw, star))
                b = self._call_with(callee, node, (pos[:i] + [v.b] + pos[i + 1:], kw, star))
                return self.join(v.guard, a, b, None)
        for k, v in kw.items():
            if isinstance(v, _Cond):
                a = self._call_with(callee, node, (pos, {**kw, k: v.a}, star))
                b = self._call_with(callee, node, (pos, {**kw, k: v.b}, star))
                return self.join(v.guard, a, b, None)
        flat = list(pos) + list(kw.values()) + list(star)
        obj = self.now(callee) if isinstance(callee, _Static) else _Unknown
        if obj is not _Unknown:
            r = self.an.known_call(obj, callee, node, args, self)
            if r is not NotImplemented:
                return r
        if any(isinstance(v, _Labels) for v in flat):
            self.an.labels_misuse(node)
        if any(_relevant(v) for v in flat):
            # an unknown callee may also change what it is given in place
            self.mutated(f"passed to `{_line(node)}`")
            return _Tainted(f"passed to `{_line(node)}`")
        if isinstance(callee, _Static) and all(isinstance(v, _Static) for v in flat):
            return self._static_or_runtime(node)
        return RUNTIME

    def _args(self, node):
        pos, kw, star = [], {}, []
        for a in node.args:
            if isinstance(a, ast.Starred):
                star.append(self.expr(a.value))
            else:
                pos.append(self.expr(a))
        for k in node.keywords:
            if k.arg is None:
                star.append(self.expr(k.value))
            else:
                kw[k.arg] = self.expr(k.value)
        return pos, kw, star

    def _static_args(self, node):
        return all(isinstance(self.expr(a), _Static) for a in node.args) and not node.keywords

    def _logits_method(self, base, attr, node):
        if attr in ("float", "contiguous") and not node.args and not node.keywords:
            return base
        if attr == "tanh" and not node.args and not node.keywords:
            return base.then("tanh")
        if attr in ("view", "reshape") and len(node.args) == 2 and not node.keywords:
            a0, a1 = (self.expr(a) for a in node.args)
            if isinstance(a0, _Static) and isinstance(a1, _Static) and self.now(a0) == -1:
                return _Logits(base.ops, a1)
        if attr in _META_METHODS:
            return self._static_or_runtime(node)
        self._args(node)
        return _Tainted(f"`{_line(node)}`")


class _Analysis:
    """Reads the forward of `model` and returns the loss it computes with labels given
    (a tree of _Cond over _Loss and _Bad leaves), or raises _Refuse."""

    def __init__(self, model, head):
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.utils import ModelOutput

        self.model, self.head = model, head
        self.causal_loss, self.model_output = ForCausalLMLoss, ModelOutput
        self.misuse = None
        self.seen_head = False
        self.head_note = None

    def labels_misuse(self, node):
        if self.misuse is None:
            self.misuse = _line(node)

    def decide(self, test, interp):
        """Conditions known in the patched forward: labels given, return_dict=True."""
        t = ast.unparse(test).replace(" ", "")
        if t in ("notreturn_dict", "return_dictisFalse"):
            return False
        if t in ("return_dict", "return_dictisnotFalse"):
            return True
        if self.is_labels_test(test, interp):
            neg = isinstance(test, ast.UnaryOp)
            inner = test.operand if neg else test
            if isinstance(inner, ast.Compare):
                return isinstance(inner.ops[0], ast.IsNot)
            return not neg
        return None

    @staticmethod
    def is_labels_test(node, interp):
        """`labels is not None`, `labels is None`, `labels`, `not labels`."""
        t = node
        if isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not):
            t = t.operand
        if isinstance(t, ast.Name):
            return isinstance(interp.lookup(t.id), _Labels)
        return (isinstance(t, ast.Compare) and len(t.ops) == 1
                and isinstance(t.ops[0], (ast.Is, ast.IsNot))
                and isinstance(t.left, ast.Name) and isinstance(interp.lookup(t.left.id), _Labels)
                and isinstance(t.comparators[0], ast.Constant)
                and t.comparators[0].value is None)

    def known_call(self, obj, callee, node, args, interp):
        pos, kw, star = args
        flat = list(pos) + list(kw.values()) + list(star)
        if obj is self.head:
            if any(_relevant(v) for v in flat):
                return _Tainted(f"the head applied to logits (`{_line(node)}`)")
            self.seen_head = True
            return _Logits()
        if obj is torch.tanh or obj is torch.nn.functional.tanh:
            if len(pos) == 1 and not kw and isinstance(pos[0], _Logits):
                return pos[0].then("tanh")
            return NotImplemented
        if obj is self.causal_loss:
            return self._causal(callee, node, args)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "loss_function":
            name = getattr(obj, "__qualname__", type(obj).__name__)
            return _Bad(f"its loss_function is {name}, not transformers' ForCausalLMLoss")
        if isinstance(obj, torch.nn.CrossEntropyLoss):
            return self._plain(obj, node, args)
        if inspect.isclass(obj) and issubclass(obj, self.model_output):
            return self._output(node, args)
        is_module = isinstance(obj, torch.nn.Module)
        contains_head = is_module and any(m is self.head for m in obj.modules())
        takes_logits = any(isinstance(v, _Logits) for v in flat)
        if contains_head or (takes_logits and (is_module or inspect.isfunction(obj))):
            if any(isinstance(v, _Labels) for v in flat):
                self.labels_misuse(node)
            r = self._follow(obj, node, args, interp)
            if contains_head and not self.seen_head and self.head_note is None:
                self.head_note = f"`{_line(node)}` reaches it in a way this module does " \
                                 f"not follow"
                if isinstance(r, _Tainted):
                    self.head_note += f" ({r.reason})"
            return r
        return NotImplemented

    def _follow(self, obj, node, args, interp):
        """A module or function that the head's output passes through (or that calls the
        head): read its body too; it must return the logits (transformed or not)."""
        if interp.depth >= _MAX_DEPTH:
            return _Tainted(f"`{_line(node)}` nests too deep")
        pos, kw, star = args
        if star:
            return _Tainted(f"`{_line(node)}` (*args/**kwargs)")
        if isinstance(obj, torch.nn.Module):
            if obj._forward_hooks or obj._forward_pre_hooks or "forward" in vars(obj):
                return _Tainted(f"{type(obj).__name__} has forward hooks")
            fn = type(obj).forward
            self_binding = [_const(obj, f"<{type(obj).__name__} at {id(obj):#x}>")]
        else:
            fn, self_binding = obj, []
        try:
            fn, fnode = _parse(fn)
            sig = inspect.signature(fn)
            bound = sig.bind(*(self_binding + list(pos)), **kw)
        except (_Refuse, TypeError, ValueError) as e:
            return _Tainted(f"`{_line(node)}`: {e}")
        bindings = {}
        for p in sig.parameters.values():
            if p.name in bound.arguments:
                v = bound.arguments[p.name]
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    vals = v if p.kind is p.VAR_POSITIONAL else list(v.values())
                    v = _Tainted("*args") if any(_relevant(x) for x in vals) else RUNTIME
                bindings[p.name] = v
            elif p.default is not p.empty:
                bindings[p.name] = _const(p.default)
            else:
                bindings[p.name] = RUNTIME
        sub = _Interp(self, fn, bindings, interp.depth + 1)
        try:
            sub.run(fnode.body)
            ret = _const(None)
        except _Return as r:
            ret = r.value
        if ret is RAISES:
            return _Tainted(f"{fn.__qualname__} raises")
        if isinstance(ret, _Cond) or _relevant(ret):
            return ret
        return ret

    def _causal(self, callee, node, args):
        pos, kw, star = args
        try:
            b = inspect.signature(self.causal_loss).bind_partial(*pos, **kw)
        except TypeError:
            return _Bad(f"unexpected arguments to the loss function (`{_line(node)}`)")
        logits, labels = b.arguments.get("logits"), b.arguments.get("labels")
        if not isinstance(logits, _Logits) or logits.flat is not None:
            why = logits.reason if isinstance(logits, _Tainted) else f"`{_line(node)}`"
            return _Bad(f"the loss is taken of something other than the head's logits "
                        f"({why})")
        if not isinstance(labels, _Labels):
            return _Bad(f"the loss is not taken of the labels as given (`{_line(node)}`)")
        vocab = b.arguments.get("vocab_size")
        if not isinstance(vocab, _Static):
            return _Bad(f"the vocabulary size in `{_line(node)}` is computed in the forward")
        options = []
        for name in ("num_items_in_batch", "ignore_index", "shift_labels"):
            if name in b.arguments:
                v = b.arguments[name]
                if not isinstance(v, _Static):
                    return _Bad(f"{name} in `{_line(node)}` is computed in the forward")
                options.append((name, v))
        uses_kwargs = False
        for s in star:
            if not isinstance(s, _Kwargs):
                return _Bad(f"arguments of the loss function are computed (`{_line(node)}`)")
            if s.mutated:
                return _Bad(f"the forward changes the **kwargs it passes to the loss "
                            f"(`{s.mutated}`)")
            uses_kwargs = True
        check = _Static(lambda ctx, c=callee: c(ctx) is self.causal_loss,
                        "loss_function is ForCausalLMLoss")
        return _Loss("causal", logits, vocab, tuple(options), uses_kwargs, check)

    def _plain(self, inst, node, args):
        pos, kw, star = args
        if star or kw or len(pos) != 2:
            return _Bad(f"unexpected arguments to CrossEntropyLoss (`{_line(node)}`)")
        logits, labels = pos
        if not isinstance(logits, _Logits) or logits.flat is None:
            why = logits.reason if isinstance(logits, _Tainted) else f"`{_line(node)}`"
            return _Bad(f"the loss is taken of something other than the head's logits "
                        f"({why})")
        if not isinstance(labels, _Labels):
            return _Bad(f"the loss is not taken of the labels as given (`{_line(node)}`)")
        if type(inst).forward is not torch.nn.CrossEntropyLoss.forward or (
                inst.weight is not None or inst.label_smoothing != 0.0
                or inst.reduction not in ("mean", "sum")):
            return _Bad(f"CrossEntropyLoss with class weights, label smoothing or "
                        f"reduction={inst.reduction!r}")
        options = (("ignore_index", _const(inst.ignore_index)),
                   ("reduction", _const(inst.reduction)))
        return _Loss("plain", _Logits(logits.ops), logits.flat, options)

    def _output(self, node, args):
        """`return SomeOutput(loss=loss, logits=logits, aux_loss=aux_loss, ...)`."""
        pos, kw, star = args
        if pos or star or "loss" not in kw:
            return _Ret(_Bad(f"the output `{_line(node)}` is not built with loss=..."))
        aux_kw = next((k.value for k in node.keywords if k.arg == "aux_loss"), None)
        return _Ret(self._aux_returned(kw["loss"], aux_kw.id if isinstance(aux_kw, ast.Name)
                                       else None))

    def _aux_returned(self, loss, name):
        """Each added `coef * x` must be the output's aux_loss, which the patched forward
        adds back."""
        if isinstance(loss, _Cond):
            return _Cond(loss.guard, self._aux_returned(loss.a, name),
                         self._aux_returned(loss.b, name))
        if isinstance(loss, _Loss) and any(n != name for n, _ in loss.aux):
            return _Bad("it adds an auxiliary loss that its output does not return as "
                        "aux_loss")
        return loss

    def run(self):
        fn, fnode = _parse(type(self.model).forward)
        sig = inspect.signature(fn)
        if "labels" not in sig.parameters:
            raise _Refuse("its forward takes no `labels`")
        bindings = {p.name: (_Kwargs() if p.kind is p.VAR_KEYWORD else RUNTIME)
                    for p in sig.parameters.values()}
        bindings[next(iter(sig.parameters))] = _const(self.model, "self")
        bindings["labels"] = LABELS
        interp = _Interp(self, fn, bindings, 0)
        try:
            interp.run(fnode.body)
            ret = _const(None)
        except _Return as r:
            ret = r.value
        if not self.seen_head:
            raise _Refuse(f"its forward does not call the output head "
                          f"({type(self.head).__name__}) where this module can see it"
                          + (f": {self.head_note}" if self.head_note else ""))
        return _normalise(self._loss_of(ret))

    def _loss_of(self, ret):
        if isinstance(ret, _Cond):
            return _Cond(ret.guard, self._loss_of(ret.a), self._loss_of(ret.b))
        if isinstance(ret, _Ret):
            return ret.loss
        if isinstance(ret, _Bad):
            return ret
        return _Bad("its forward does not return a ModelOutput built with loss=... where "
                    "this module can see it")


# --------------------------------------------------------------------------------------
# The plan: what apply() decided, evaluated at each call
# --------------------------------------------------------------------------------------

class _Meta:
    """Stands for the logits in the model's own conditions: shape, dtype, device."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.ndim = len(shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self):
        return self.ndim


def _eval(static, ctx):
    return static(ctx)


def _fold(ops, ctx, out):
    for op in ops:
        if op[0] == "cond":
            _fold(op[2] if _eval(op[1], ctx) else op[3], ctx, out)
        elif op[0] == "tanh":
            out.append(("tanh", None))
        else:
            out.append((op[0], _eval(op[1], ctx)))
    return out


def _resolve(tree, ctx):
    while isinstance(tree, _Cond):
        tree = tree.a if _eval(tree.guard, ctx) else tree.b
    return tree


def _scale_and_cap(ops):
    """ops on z = x W^T + b -> (scale s, softcap c): the result is c tanh(s z / c), or
    s z without a cap.  tanh(m z) p = p tanh(m p z / p)."""
    pre, post, tanh = 1.0, 1.0, False
    for op, v in ops:
        if op == "tanh":
            if tanh:
                raise ValueError("tanh applied twice to the logits")
            tanh = True
            continue
        if v is None:
            raise ValueError(f"a {op} of the logits by None")
        if op == "div":
            v = 1.0 / v
        if tanh:
            post = post * v
        else:
            pre = pre * v
    if not tanh:
        return pre, None
    if torch.is_tensor(post):
        if post.requires_grad:
            raise ValueError("the softcap is a trainable tensor")
        post = post.item()
    post = float(post)
    if not post > 0:
        raise ValueError(f"softcap {post} is not positive")
    return pre * post, post


def _describe(tree, model, ctx):
    if isinstance(tree, _Cond):
        try:
            g = _eval(tree.guard, ctx)
        except Exception:
            cond = tree.guard.src.split(" | ")[0]
            return (f"if `{cond}`: {_describe(tree.a, model, ctx)}; otherwise: "
                    f"{_describe(tree.b, model, ctx)}")
        return _describe(tree.a if g else tree.b, model, ctx)
    if isinstance(tree, _Bad):
        return f"refused: {tree.reason}"
    ops = _fold(tree.logits.ops, ctx, [])
    scale, cap = _scale_and_cap(ops)
    parts = [("shifted" if tree.kind == "causal" else "unshifted")]
    if not (isinstance(scale, float) and scale == 1.0):
        parts.append(f"logits scaled by {float(scale):.6g}")
    if cap is not None:
        parts.append(f"softcap {cap:g}")
    if tree.aux:
        parts.append("+ router aux loss")
    return ", ".join(parts)


def _plan_for(model, head):
    try:
        analysis = _Analysis(model, head)
        tree = analysis.run()
        misuse = analysis.misuse
    except _Refuse as e:
        raise _api_error(model, str(e)) from None
    except RecursionError:  # pragma: no cover
        raise _api_error(model, "its forward is too deeply nested to read") from None
    # decide now what can be decided now
    # the logits' metadata as far as it is known before a call: (batch, time, vocabulary)
    # with the first two unknown; a condition that needs them stays undecided (and is
    # decided again, with the real shape, at every call)
    now = _Ctx(_Meta((None, None, head.weight.shape[0]), head.weight.dtype,
                     head.weight.device))
    reachable = _reachable(tree, now)
    bad = [leaf for leaf, definite in reachable if isinstance(leaf, _Bad) and definite]
    if bad:
        raise _api_error(model, bad[0].reason)
    for leaf, definite in reachable:
        if isinstance(leaf, _Loss) and definite:
            try:
                _scale_and_cap(_fold(leaf.logits.ops, now, []))
                if leaf.check is not None and not leaf.check(now):
                    raise _api_error(model, "its loss_function is not transformers' "
                                            "ForCausalLMLoss")
                v = leaf.vocab(now) if leaf.vocab is not None else None
            except _Unknown:
                continue
            except UnsupportedModelError:
                raise
            except Exception as e:
                raise _api_error(model, f"the logits' transform cannot be reproduced ({e})")
            if v is not None and int(v) != head.weight.shape[0]:
                raise _api_error(model, f"its loss views the logits with vocab_size {v}, "
                                        f"not the head's {head.weight.shape[0]} rows")
    kinds = {leaf.kind for leaf in _leaves(tree) if isinstance(leaf, _Loss)}
    if not kinds:
        raise _api_error(model, "no loss this module reproduces is reachable")
    if len(kinds) > 1:
        raise _api_error(model, "its forward takes a different kind of loss depending on "
                                "its configuration")
    (kind,) = kinds
    if kind == "plain" and misuse is not None:
        # such a forward runs without labels in the patched model: they must not matter
        # before the loss
        raise _api_error(model, f"its forward uses the labels for more than the loss "
                                f"(`{misuse}`)")
    return tree, kind


def _leaves(tree):
    if isinstance(tree, _Cond):
        return _leaves(tree.a) + _leaves(tree.b)
    return [tree]


def _reachable(tree, ctx, definite=True):
    """[(leaf, reached for sure)] under what can be evaluated now."""
    if not isinstance(tree, _Cond):
        return [(tree, definite)]
    try:
        g = _eval(tree.guard, ctx)
    except Exception:
        return _reachable(tree.a, ctx, False) + _reachable(tree.b, ctx, False)
    return _reachable(tree.a if g else tree.b, ctx, definite)


def _check_head(model, head):
    if head is None:
        raise _api_error(model, "it has no output embeddings (get_output_embeddings() is None)")
    if not isinstance(head, torch.nn.Linear):
        raise _api_error(model, f"its output embeddings are a {type(head).__name__}, not an "
                                f"nn.Linear")
    if type(head).forward is not torch.nn.Linear.forward:
        raise _api_error(model, f"its output head {type(head).__name__} has a forward of "
                                f"its own")
    extra = [n for n, _ in head.named_parameters(recurse=True) if n not in ("weight", "bias")]
    if extra or list(head.children()):
        raise _api_error(model, f"its output head {type(head).__name__} has parameters or "
                                f"submodules beyond weight and bias ({extra})")
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        raise _api_error(model, "its output head has forward hooks (or a replaced forward), "
                                "whose effect on the logits cannot be reproduced")


def apply(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model(..., labels=...)` compute its loss with softmax_ce's fused linear
    cross-entropy, never materialising the logits.  Idempotent; returns the model.

    Raises UnsupportedModelError (a TypeError), leaving the model untouched, when the
    model's loss is not one this module reproduces exactly; `explain(model)` says what
    it would compute."""
    if hasattr(model, _ORIGINAL):
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    _check_head(model, head)
    tree, kind = _plan_for(model, head)
    # transformers' ForCausalLMLoss: the forward runs with its labels (they may matter
    # before the head, as in Gemma 3's masks) and a loss_function that computes nothing;
    # a plain CrossEntropyLoss in the forward: the forward runs without labels
    pass_labels = kind == "causal"

    original = model.forward
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values()
                   if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let the stock forward say what is wrong
        labels = bound.arguments.get("labels")
        if labels is None:
            return original(*args, **kwargs)
        call_kwargs = dict(bound.arguments.get(var_kw, {})) if var_kw else {}
        if "return_dict" in signature.parameters:
            return_dict = bound.arguments.get("return_dict")
            bound.arguments["return_dict"] = True
        else:
            return_dict = call_kwargs.get("return_dict")
            call_kwargs["return_dict"] = True
        if var_kw:
            bound.arguments[var_kw] = call_kwargs
        if not pass_labels:
            bound.arguments["labels"] = None
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)

        if head._forward_hooks or "forward" in vars(head):
            raise _api_error(model, "its output head got forward hooks (or a replaced "
                                    "forward) after apply(), whose effect on the logits "
                                    "cannot be reproduced", RuntimeError)
        captured = []

        def hand_back_hidden_states(hidden_states):
            captured.append(hidden_states)
            return hidden_states  # the stock forward's "logits": never used below

        head.forward = hand_back_hidden_states
        if pass_labels:
            had_loss_fn = "_loss_function" in vars(model)
            previous = vars(model).get("_loss_function")
            model._loss_function = _no_loss
        try:
            out = original(*bound.args, **bound.kwargs)
        finally:
            del head.forward  # back to nn.Linear.forward
            if pass_labels:
                if had_loss_fn:
                    model._loss_function = previous
                else:
                    del model._loss_function
        if len(captured) != 1:
            raise _api_error(model, f"the output head was called {len(captured)} times in "
                                    f"one forward", RuntimeError)
        (hidden,) = captured
        loss = _loss(model, tree, head, hidden, labels, call_kwargs, out)
        # rebuilt rather than assigned: a ModelOutput orders its fields by declaration and
        # drops None ones only when built, so loss comes first and logits vanish, as stock
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        rebuilt = type(out)(loss=loss, **fields)
        if return_dict:
            return rebuilt
        # stock's tuple: its non-None fields in order, the logits among them; keep every
        # position (None where the logits were), so that out[1], out[2] mean what they did
        names = [f.name for f in dataclasses.fields(type(out))]
        return tuple(None if n == "logits" else rebuilt[n] for n in names
                     if n == "logits" or rebuilt.get(n) is not None)

    setattr(model, _ORIGINAL, original)
    setattr(model, _PLAN, tree)
    model.forward = forward
    return model


def _no_loss(logits, *args, **kwargs):
    """The stock forward's loss_function while the patched forward runs: nothing."""
    return torch.zeros((), dtype=torch.float32, device=logits.device)


def _loss(model, tree, head, hidden, labels, call_kwargs, out):
    V = head.weight.shape[0]
    ctx = _Ctx(_Meta(tuple(hidden.shape[:-1]) + (V,), hidden.dtype, hidden.device))
    try:
        leaf = _resolve(tree, ctx)
        if isinstance(leaf, _Bad):
            raise ValueError(leaf.reason)
        if leaf.check is not None and not leaf.check(ctx):
            raise ValueError("its loss_function is no longer transformers' ForCausalLMLoss")
        scale, cap = _scale_and_cap(_fold(leaf.logits.ops, ctx, []))
        vocab = int(leaf.vocab(ctx)) if leaf.vocab is not None else V
        options = {k: v(ctx) for k, v in leaf.options}
        coefs = [c(ctx) for _, c in leaf.aux]
    except (_Unknown, ValueError, TypeError) as e:
        raise _api_error(model, f"this call's loss cannot be reproduced ({e})",
                         RuntimeError) from None
    if vocab != V:
        raise _api_error(model, f"its loss views the logits with vocab_size {vocab}, not "
                                f"the head's {V} rows", RuntimeError)
    bias = head.bias
    if not (isinstance(scale, float) and scale == 1.0):
        hidden = hidden * scale
        if bias is not None:
            bias = bias * scale
    target = labels
    if leaf.kind == "causal":
        if leaf.kwargs:
            for k in ("num_items_in_batch", "ignore_index", "shift_labels"):
                if k in call_kwargs and k not in options:
                    options[k] = call_kwargs[k]
        n_items = options.get("num_items_in_batch")
        ignore_index = options.get("ignore_index", IGNORE_INDEX)
        shift_labels = options.get("shift_labels")
        shift = shift_labels is None
        if not shift:
            target = shift_labels
        reduction = "sum" if n_items is not None else "mean"
    else:
        n_items, shift = None, False
        ignore_index, reduction = options["ignore_index"], options["reduction"]
    loss = linear_cross_entropy(hidden, head.weight, target.to(hidden.device),
                                linear_bias=bias, ignore_index=ignore_index,
                                reduction=reduction, softcap=cap, shift=shift,
                                loss_dtype=torch.float32)
    if n_items is not None:
        if torch.is_tensor(n_items):
            n_items = n_items.to(loss.device)
        loss = loss / n_items
    aux = getattr(out, "aux_loss", None) if coefs else None
    if aux is not None:
        for c in coefs:
            loss = loss + c * aux.to(loss.device)
    return loss


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`."""
    if hasattr(model, _ORIGINAL):
        del model.forward
        delattr(model, _ORIGINAL)
        if hasattr(model, _PLAN):
            delattr(model, _PLAN)
    return model


def explain(model: torch.nn.Module) -> str:
    """What `apply(model)` would compute, in words, or why it refuses (never raises)."""
    try:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        _check_head(model, head)
        tree = getattr(model, _PLAN, None) or _plan_for(model, head)[0]
        now = _Ctx(_Meta((None, None, head.weight.shape[0]), head.weight.dtype,
                         head.weight.device))
        return _describe(tree, model, now)
    except UnsupportedModelError as e:
        return f"refused: {e.reason}"


def _clone(model):
    try:
        return copy.deepcopy(model)
    except RuntimeError:  # weight-normed modules refuse a deepcopy: rebuild, then load
        clone = type(model)(model.config)
        clone.load_state_dict(model.state_dict())
        clone.to(next(model.parameters()).device)
        clone.train(model.training)
        return clone


def check(model: torch.nn.Module, *, batch_size: int = 2, seq_len: int = 16,
          rtol: float = 1e-5, grad_rtol: float = 1e-4, seed: int = 0, **forward_kwargs):
    """Compare the stock loss and parameter gradients of `model` with the patched ones on a
    random batch (labels with -100s), on copies (the model itself is not changed).

    Returns a dict (loss_stock, loss_patched, max_grad_rel_err, worst_parameter, plan);
    raises UnsupportedModelError when apply() refuses the model and AssertionError when
    they differ beyond rtol (loss) or grad_rtol (each gradient, relative to its largest
    entry, or to 1e-3 of the model's largest gradient entry if that is more: gradients
    that are zero in exact arithmetic, such as an attention key's bias, are rounding
    noise in both).  fp32 models; for bf16 ones pass looser tolerances (rtol=1e-2,
    grad_rtol=5e-2).  `forward_kwargs` go to both forwards (output_router_logits=True,
    use_cache=False, ...)."""
    stock = _clone(model)
    revert(stock)
    patched = apply(_clone(stock))
    V = patched.get_output_embeddings().weight.shape[0]
    cfg = stock.config.get_text_config() if hasattr(stock.config, "get_text_config") \
        else stock.config
    vocab = min(V, getattr(cfg, "vocab_size", V) or V)
    special = set()
    for c in {id(stock.config): stock.config, id(cfg): cfg}.values():
        for k, v in vars(c).items():
            if (k.endswith("token_id") or k.endswith("token_index")) and isinstance(v, int):
                special.add(v)  # image / audio placeholders want inputs of their own
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or [0])
    g = torch.Generator().manual_seed(seed)
    device = next(stock.parameters()).device
    ids = allowed[torch.randint(0, len(allowed), (batch_size, seq_len), generator=g)]
    ids = ids.to(device)
    labels = ids.clone()
    labels[0, : seq_len // 4] = IGNORE_INDEX
    labels[-1, -(seq_len // 4):] = IGNORE_INDEX
    results = []
    for m in (stock, patched):
        m.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(b"check") + seed)
            out = m(input_ids=ids, labels=labels, **forward_kwargs)
        loss = out["loss"] if isinstance(out, dict) else out[0]
        loss.backward()
        results.append(loss.detach().float())
    worst, worst_name = 0.0, None
    top = max((p.grad.abs().max().item() for p in stock.parameters() if p.grad is not None),
              default=0.0)
    for (name, p1), (_, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        if (p1.grad is None) != (p2.grad is None):
            raise AssertionError(f"{name}: gradient in only one of stock and patched")
        if p1.grad is None:
            continue
        scale = max(p1.grad.abs().max().item(), 1e-3 * top)
        err = (p1.grad.float() - p2.grad.float()).abs().max().item()
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        if rel > worst:
            worst, worst_name = rel, name
    l1, l2 = results
    report = dict(loss_stock=l1.item(), loss_patched=l2.item(), max_grad_rel_err=worst,
                  worst_parameter=worst_name, plan=explain(patched))
    if not torch.allclose(l2, l1, rtol=rtol, atol=0):
        raise AssertionError(f"loss differs: stock {l1.item():.8g}, patched {l2.item():.8g}")
    if worst > grad_rtol:
        raise AssertionError(f"gradient of {worst_name} differs by {worst:.3g} of its largest "
                             f"entry")
    return report
