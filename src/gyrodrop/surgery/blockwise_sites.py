"""Where a model has ``Dropout -> Linear`` (or ``Linear -> Dropout``) pairs that
:func:`gyrodrop.apply_block_gyro` can fuse (torch.fx tracing, with a fallback to
``nn.Sequential`` order): model analysis for block-wise surgery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gyrodrop._validation import check_choice
from gyrodrop.stepping import SteppedModule

__all__ = ["BlockSite", "find_block_sites", "SurgeryPrune", "SURGERY_PRUNE", "CONV1D_NOT_FUSED"]

#: ``prune`` of the surgery: a side, or ``"auto"`` (what each site allows).
SurgeryPrune = Literal["input", "output", "auto"]
SURGERY_PRUNE: tuple[SurgeryPrune, ...] = ("input", "output", "auto")

# Activations that commute with a non-negative scaled mask: f(c * y) = c * f(y) for c >= 0,
# so ``Dropout(f(Linear(x)))`` equals ``f(Dropout(Linear(x)))`` with the same mask.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu)
_FUNCTIONAL_DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout)


@dataclass(frozen=True)
class BlockSite:
    """A place where block-wise dropout can be fused: the ``nn.Dropout`` at
    ``dropout`` (qualified module name) becomes ``nn.Identity`` and the ``nn.Linear``
    at ``linear`` becomes a :class:`BlockGyroLinear` with ``prune`` (``"input"``:
    Dropout -> Linear; ``"output"``: Linear [-> ReLU-like] -> Dropout)."""

    dropout: str
    linear: str
    prune: str


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps gyrodrop modules whole (their forward reads buffers)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, SteppedModule)
            or _is_hf_conv1d(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _is_hf_conv1d(m: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2 and relatives): a Linear whose weight is stored
    transposed, ``(in_features, out_features)``; recognized without importing
    transformers."""
    return (
        type(m).__name__ == "Conv1D"
        and type(m).__module__.startswith("transformers")
        and isinstance(m._parameters.get("weight"), Tensor)  # not getattr: fx patches it
    )


#: Why a Hugging Face ``Conv1D`` next to a dropout is not fused.
CONV1D_NOT_FUSED = (
    "a Hugging Face Conv1D (a Linear with its weight stored transposed, (in, out)): "
    "BlockGyroLinear needs nn.Linear's (out, in) weight, and fusing would replace the "
    "parameter by its transpose (another state-dict shape, and an optimizer built before "
    "would train a stale tensor), so it is not fused; apply_gyro_dropout handles this dropout"
)


def _module_uses(model: nn.Module) -> dict[int, int]:
    """How many names each module instance has in ``model`` (shared modules > 1)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


@dataclass
class _Candidate:
    """One ``nn.Dropout`` and the Linear it could be fused with on each side
    (``None``, with a reason, where it cannot)."""

    dropout: str
    after: str | None  # the Linear it feeds (input fusion)
    before: str | None  # the Linear feeding it (output fusion)
    why_not_after: str
    why_not_before: str
    blocked: str | None = None  # a reason that rules out both


def find_block_sites(
    model: nn.Module, prune: SurgeryPrune = "input"
) -> tuple[list[BlockSite], list[str]]:
    """The fusable ``nn.Dropout``/``nn.Linear`` pairs of ``model`` and, for every other
    ``nn.Dropout`` (or functional dropout call), why it cannot be fused.

    The dataflow comes from ``torch.fx`` symbolic tracing (any model it can trace:
    nested containers, custom modules, functional code between layers). Where tracing
    the whole model fails (Hugging Face models, data-dependent control flow), every
    child module is traced on its own, and the children of those that fail in turn, so
    the pairs inside traceable submodules are still found (BERT's ``BertSelfOutput``
    and ``BertOutput``: ``dense -> dropout``, output fusion); an ``nn.Sequential``
    that does not trace is searched in its order; a dropout directly inside a module
    that does not trace is named with that module and the tracing error. The first
    reason says the whole model did not trace. A Hugging Face ``Conv1D`` (GPT-2) next
    to a dropout is not fused: see :data:`CONV1D_NOT_FUSED`.

    ``prune``: ``"input"`` fuses ``Dropout -> Linear``; ``"output"`` fuses
    ``Linear [-> ReLU/LeakyReLU/PReLU] -> Dropout`` (these activations commute with a
    non-negative mask); ``"auto"`` picks a side for every dropout so that the pruned
    GEMM work (``in * out`` of the fused Linears) is largest, ties going to input
    fusion. For an MLP ``Linear(784, 2048) -> ReLU -> Dropout -> Linear(2048, 2048) ->
    ReLU -> Dropout -> Linear(2048, 10)`` that is output fusion twice (the two large
    Linears) where input fusion would prune the large and the small one.

    A pair is fused only when both modules are registered and called once, and the
    dropout's output goes only to that Linear (input fusion) or the Linear's output
    reaches only the dropout (output fusion), so that swapping both in place changes
    nothing else.
    """
    check_choice("find_block_sites", "prune", prune, SURGERY_PRUNE)
    uses = _module_uses(model)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: submodule by submodule
        candidates, problems = _piecewise_candidates(model, uses, _short(exc))
        problems.insert(
            0,
            f"torch.fx could not trace the model ({_short(exc)}); its submodules were "
            "traced one by one instead (nn.Sequential containers that do not trace: in "
            "their order)",
        )
    else:
        candidates, problems = _graph_candidates(model, graph, uses)
    weights = {
        name: m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    sites, unresolved = _resolve(candidates, prune, weights)
    return sites, problems + unresolved


def _resolve(
    candidates: list[_Candidate], prune: str, weights: dict[str, int]
) -> tuple[list[BlockSite], list[str]]:
    """Assign Linears to dropouts, each Linear at most once.

    ``"input"`` / ``"output"``: every dropout takes the Linear on that side.
    ``"auto"``: the assignment that prunes the most GEMM work, ``weights[linear]``
    (``in * out``) summed over the fused Linears, ties going to input fusion. A Linear
    can be wanted by two dropouts only (the one feeding it, the one it feeds), so the
    conflicts form chains ``D1 -> L -> D2 -> L' -> D3 ...``, solved exactly by dynamic
    programming along each chain.
    """
    chosen: dict[str, BlockSite] = {}
    live = [c for c in candidates if not c.blocked]
    if prune in ("input", "output"):
        for c in live:
            linear = c.after if prune == "input" else c.before
            if linear is not None:
                chosen[c.dropout] = BlockSite(c.dropout, linear, prune)
    else:
        fed_by = {c.before: c for c in live if c.before is not None}  # Linear -> dropout
        follower = {c.dropout: fed_by.get(c.after) for c in live if c.after is not None}
        has_prev = {d.dropout for d in follower.values() if d is not None}
        for start in live:
            if start.dropout in has_prev:
                continue
            chain = [start]
            while (nxt := follower.get(chain[-1].dropout)) is not None:
                chain.append(nxt)
            for c, side in zip(chain, _best_chain(chain, weights), strict=True):
                if side is not None:
                    linear = c.after if side == "input" else c.before
                    assert linear is not None
                    chosen[c.dropout] = BlockSite(c.dropout, linear, side)
    sites = [chosen[c.dropout] for c in candidates if c.dropout in chosen]
    problems = []
    for c in candidates:
        if c.dropout in chosen:
            continue
        if c.blocked:
            problems.append(f"{c.dropout}: {c.blocked}")
            continue
        reasons = []
        if prune in ("input", "auto"):
            reasons.append(c.why_not_after if c.after is None else f"{c.after} is fused already")
        if prune in ("output", "auto"):
            reasons.append(c.why_not_before if c.before is None else f"{c.before} is fused already")
        hint = ""
        if prune == "input" and c.before is not None:
            hint = "; prune='auto' or 'output' would fuse it into the Linear before it"
        problems.append(f"{c.dropout}: " + "; ".join(reasons) + hint)
    return sites, problems


def _best_chain(chain: list[_Candidate], weights: dict[str, int]) -> list[str | None]:
    """The side (``"input"``, ``"output"`` or ``None``) of each dropout of a chain in
    which dropout ``i``'s Linear after it is dropout ``i + 1``'s Linear before it, that
    maximizes (pruned work, number of input fusions)."""
    Score = tuple[int, int]
    # best[t]: (score, sides) over the dropouts so far, t = the last one took its 'after'
    best: dict[bool, tuple[Score, list[str | None]]] = {False: ((0, 0), [])}
    for c in chain:
        nxt: dict[bool, tuple[Score, list[str | None]]] = {}
        for took_after, (score, sides) in best.items():
            options: list[tuple[str | None, Score]] = [(None, (0, 0))]
            if c.after is not None:
                options.append(("input", (weights.get(c.after, 0), 1)))
            if c.before is not None and not took_after:  # shared with the previous 'after'
                options.append(("output", (weights.get(c.before, 0), 0)))
            for side, (w, n_in) in options:
                total = (score[0] + w, score[1] + n_in)
                key = side == "input"
                if key not in nxt or total > nxt[key][0]:
                    nxt[key] = (total, [*sides, side])
        best = nxt
    return max(best.values(), key=lambda v: v[0])[1]


def _short(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 160 characters)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _piecewise_candidates(
    model: nn.Module, uses: dict[int, int], why: str
) -> tuple[list[_Candidate], list[str]]:
    """Candidates of a model that does not trace whole: each child traced on its own,
    recursing into the children of those that fail too; names are qualified in
    ``model``."""
    candidates: list[_Candidate] = []
    problems: list[str] = []

    def visit(module: nn.Module, prefix: str, why: str) -> None:
        covered: set[str] = set()
        if isinstance(module, nn.Sequential):
            found = _sequence_candidates(module, prefix, uses)
            candidates.extend(found)
            covered = {c.dropout for c in found}
        for name, child in module.named_children():
            path = prefix + name
            if isinstance(child, SteppedModule) or _is_hf_conv1d(child):
                continue
            if not child._modules:  # a leaf: only the module around it can place it
                if type(child) is nn.Dropout and path not in covered:
                    owner = prefix[:-1] or "the model"
                    problems.append(
                        f"{path}: called by {owner} ({type(module).__name__}), which "
                        f"torch.fx could not trace ({why})"
                    )
                continue
            if type(child).__module__.startswith("torch.nn") and not isinstance(
                child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
            ):
                continue  # torch.nn layers (nn.TransformerEncoderLayer...) are not entered
            try:
                graph = _LeafTracer().trace(child)
            except Exception as exc:  # noqa: BLE001 - any failure: one level deeper
                visit(child, path + ".", _short(exc))
            else:
                found, notes = _graph_candidates(child, graph, uses, path + ".")
                candidates.extend(found)
                problems.extend(notes)

    visit(model, "", why)
    return candidates, problems


def _graph_candidates(
    model: nn.Module, graph: torch.fx.Graph, uses: dict[int, int], prefix: str = ""
) -> tuple[list[_Candidate], list[str]]:
    """Candidates of ``model`` from its traced ``graph``; names get ``prefix`` (the
    qualified name of ``model`` in the root, with a trailing dot); ``uses`` counts
    names in the root, so a module shared outside ``model`` is seen as shared."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    def is_module(node: object, kinds: tuple[type, ...]) -> bool:
        if not isinstance(node, torch.fx.Node) or node.op != "call_module":
            return False
        return type(modules.get(str(node.target))) in kinds

    def once(node: torch.fx.Node) -> bool:
        name = str(node.target)
        return calls.get(name, 0) == 1 and uses[id(modules[name])] == 1

    def conv1d(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and _is_hf_conv1d(modules[str(node.target)])

    def homogeneous(node: torch.fx.Node) -> bool:
        return (
            is_module(node, _HOMOGENEOUS_MODULES)
            or (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        )

    candidates: list[_Candidate] = []
    problems: list[str] = []
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT) or (
            node.op == "call_method" and node.target == "dropout"
        ):
            problems.append(
                f"{prefix}{node.name}: a functional dropout call cannot be swapped in place"
            )
            continue
        if not is_module(node, (nn.Dropout,)):
            continue
        c = _Candidate(prefix + str(node.target), None, None, "", "")
        candidates.append(c)
        if not once(node):
            c.blocked = "the Dropout is registered or called more than once"
            continue
        # input side: the dropout's only consumer is a Linear called once
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        if nxt is None:
            c.why_not_after = f"its output has {len(users)} consumers"
        elif conv1d(nxt):
            c.why_not_after = f"followed by {prefix}{nxt.target}, {CONV1D_NOT_FUSED}"
        elif not (is_module(nxt, (nn.Linear,)) and nxt.args[:1] == (node,)):
            what = prefix + str(nxt.target) if nxt.op == "call_module" else nxt.name
            c.why_not_after = f"followed by {what}, not an nn.Linear"
        elif not once(nxt):
            c.why_not_after = f"the Linear after it ({prefix}{nxt.target}) is called more than once"
        else:
            c.after = prefix + str(nxt.target)
        # output side: back through ReLU-like activations to a Linear that feeds only it
        prev = node.args[0] if node.args else None
        while isinstance(prev, torch.fx.Node) and homogeneous(prev) and len(prev.users) == 1:
            prev = prev.args[0] if prev.args else None
        if isinstance(prev, torch.fx.Node) and conv1d(prev):
            c.why_not_before = f"the layer before it ({prefix}{prev.target}) is {CONV1D_NOT_FUSED}"
        elif not (isinstance(prev, torch.fx.Node) and is_module(prev, (nn.Linear,))):
            c.why_not_before = "no nn.Linear before it (through ReLU-like activations only)"
        elif len(prev.users) != 1 or not once(prev):
            c.why_not_before = f"the Linear before it ({prefix}{prev.target}) is used elsewhere too"
        else:
            c.before = prefix + str(prev.target)
    return candidates, problems


def _sequence_candidates(seq: nn.Sequential, prefix: str, uses: dict[int, int]) -> list[_Candidate]:
    """Candidates among the direct children of one ``nn.Sequential`` (its order is
    its dataflow); names get ``prefix``."""
    candidates: list[_Candidate] = []
    names = [prefix + k for k in seq._modules]
    children = list(seq._modules.values())
    for i, child in enumerate(children):
        if type(child) is not nn.Dropout:
            continue
        c = _Candidate(names[i], None, None, "", "")
        candidates.append(c)
        if uses[id(child)] != 1:
            c.blocked = "the Dropout is registered more than once"
            continue
        nxt = children[i + 1] if i + 1 < len(children) else None
        if nxt is not None and _is_hf_conv1d(nxt):
            c.why_not_after = f"followed by {names[i + 1]}, {CONV1D_NOT_FUSED}"
        elif type(nxt) is not nn.Linear:
            c.why_not_after = "not followed by an nn.Linear in its Sequential"
        elif uses[id(nxt)] != 1:
            c.why_not_after = f"the Linear after it ({names[i + 1]}) is shared"
        else:
            c.after = names[i + 1]
        j = i - 1
        while j >= 0 and type(children[j]) in _HOMOGENEOUS_MODULES:
            j -= 1
        if j >= 0 and _is_hf_conv1d(children[j]):
            c.why_not_before = f"the layer before it ({names[j]}) is {CONV1D_NOT_FUSED}"
        elif j < 0 or type(children[j]) is not nn.Linear:
            c.why_not_before = "no nn.Linear before it in its Sequential"
        elif uses[id(children[j])] != 1:
            c.why_not_before = f"the Linear before it ({names[j]}) is shared"
        else:
            c.before = names[j]
    return candidates
