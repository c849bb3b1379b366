"""Predictive uncertainty from the dropout family: Monte-Carlo dropout and the
deterministic ensemble of gyro subnetworks.

Both run the model several times on the same inputs (repeated along the batch dim, a
chunk of samples per forward) and summarize the class probabilities ``p_s(c | x)`` of
the ``S`` passes as a :class:`Prediction`:

- ``mean``: ``(1/S) sum_s p_s``, the predictive distribution;
- ``variance``: the variance over passes of ``p_s(c | x)``, averaged over classes;
- ``entropy``: ``H[mean]``, total uncertainty;
- ``mutual_info``: ``H[mean] - (1/S) sum_s H[p_s]`` (BALD), the part due to
  disagreement between passes (epistemic); ``0 <= mutual_info <= entropy``.

Only the dropout family is stochastic during the passes; everything else runs in
``eval()`` mode (BatchNorm uses and keeps its running statistics). The model's modes,
its step counters and the global random state are exactly as before afterwards, also
when a forward raises.

Gyro dropout trained ``num_subnets`` (sigma) fixed subnetworks, so its passes use
*those* rather than fresh random masks: one subnetwork per pass for all rows.
:func:`subnet_ensemble_predict` averages over all of them (or a seeded subset),
deterministically; :func:`mc_predict` draws them without replacement, seeded (all
sigma once each before any repeats).

Which layer mask makes up "subnetwork j" of a model with several gyro layers
(``pairing``): every layer follows its own seeded schedule, and row group ``g`` of step
``t`` trains the combination of the layers' ``g``-th active masks. ``"trained"`` takes
those combinations, position ``j`` of the schedule's stream in the last complete cycle
(each trained together for ``steps_per_set`` steps); it needs every gyro layer to share
``num_subnets``, ``subnets_per_step``, ``steps_per_set``, the consecutive schedule and
the step. ``"index"`` gives every layer its mask ``j mod num_subnets`` (layers with
different sigma cycle through theirs). ``"auto"`` (default): ``"trained"`` when
possible, else ``"index"`` with a warning saying why; the returned
:class:`Prediction` names the pairing used (``pairing``, ``pairing_reason``).

Rows: the passes of one forward are stacked along dim 0 (pass-major). A gyro layer
whose input has ``passes * N`` rows gets one mask per pass; a layer that sees other
rows (a ``(B*T, H)`` flattening, Swin windows, a sequence-first ``(T, B, H)`` layout)
makes the passes run one per forward instead, where its one mask covers all its rows.

Fused inference paths: ``nn.TransformerEncoderLayer`` takes a fused kernel in eval
mode that never calls its dropout children, so during the passes its own ``training``
flag is set (not its children's); ``nn.MultiheadAttention`` with ``dropout > 0`` is
part of the dropout family for :func:`mc_predict` (its attention dropout is sampled).
Dropout layers that are never called in the passes (a parent that applies dropout
functionally, dead modules) and passes that all come out identical are warned about.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from gyrodrop import masks
from gyrodrop._modules import unwrap_model
from gyrodrop._validation import check_int, check_seed
from gyrodrop.schedule import SteppedModule
from gyrodrop.stochastic_depth import (
    StochasticDepth,
    StochasticDepthBlock,
    StochasticDepthLayer,
)
from gyrodrop.uncertainty.hooks import (
    Members,
    count_calls,
    fused_parents,
    gyro_layers,
    gyro_passes,
    mc_draws,
    resolve_pairing,
    seeded_rng,
    stochastic_eval,
    warn_uncalled,
)
from gyrodrop.uncertainty.passes import (
    OUTPUTS,
    PAIRINGS,
    Batch,
    Output,
    Pairing,
    Prediction,
    batch_device,
    batch_rows,
    check_inputs,
    chunk_size,
    run_passes,
)

__all__ = [
    "Prediction",
    "mc_predict",
    "subnet_ensemble_predict",
    "PAIRINGS",
    "OUTPUTS",
    "Pairing",
    "Output",
]

DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# --------------------------------------------------------------------------------------
# Public API.


def mc_predict(
    model: nn.Module,
    x: Batch,
    samples: int = 30,
    *,
    seed: int = 0,
    batch_samples: int | None = None,
    output: Output = "logits",
    pairing: Pairing = "auto",
    output_fn: Callable[[Any], Tensor] | None = None,
    temperature: float = 1.0,
) -> Prediction:
    """Monte-Carlo dropout: ``samples`` stochastic passes with only the dropout family
    active, summarized as a :class:`Prediction`.

    Active during the passes: ``nn.Dropout`` (and ``Dropout1d/2d/3d``,
    ``AlphaDropout``), the attention dropout of ``nn.MultiheadAttention``,
    :class:`~gyrodrop.GyroDropout` and ``BlockGyroLinear`` (one
    trained subnetwork per pass, drawn without replacement; see the module docstring),
    :class:`~gyrodrop.StochasticDepth` (one decision per pass in block mode, per example
    and pass in sample mode), and any other gyrodrop stepped module (in training mode).
    All other modules are in eval mode; BatchNorm statistics are untouched;
    ``nn.TransformerEncoderLayer`` leaves its fused inference path so that its dropout
    children run.

    Nothing leaks: module modes, step counters and the global random state are restored
    (also on an exception). ``nn.Dropout`` draws from generators seeded with ``seed``
    inside a fork of the global state.

    Args:
        model: a classifier returning class scores ``(rows, C)`` (DDP /
            ``torch.compile`` wrappers are looked through), or a regressor
            (``output="regression"``).
        x: inputs, ``(N, *)``, or a dict of keyword arguments (``model(**x)``, e.g.
            ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
        samples: number of passes ``S`` (>= 1).
        seed: the same seed gives the same result. Without ``nn.Dropout`` the result
            does not depend on ``batch_samples`` either.
        batch_samples: passes per forward (``x`` repeated along dim 0); default: as many
            as fit in 2048 rows. Lower it when memory is short.
        output: what the model returns. ``"logits"``: class scores, softmax is
            applied (right for log-probabilities too). ``"probs"``: class
            probabilities; refused (``ValueError`` naming ``output="logits"``) when a
            value is below ``-PROB_TOL`` or a row's sum is off 1 by more than
            ``PROB_TOL`` (``1e-3``; ``1e-2`` for float16/bfloat16 outputs).
            ``"regression"``: the predictive mean ``(rows,)`` or ``(rows, D)``, or a
            ``(mean, variance)`` tuple of two such tensors (the model's own predicted
            variance, >= 0: return ``exp(log_var)``, not ``log_var``); the
            :class:`Prediction` then holds the mean and the predictive variance, the
            between-pass variance plus the mean of the model's variances.
        pairing: how gyro layers combine into subnetworks (module docstring).
        output_fn: maps the model's output to class scores ``(rows, C)``; default: the
            output itself, or its ``.logits`` (Hugging Face ``ModelOutput``).
        temperature: ``T > 0``; the passes' logits are divided by ``T`` before the
            softmax (temperature scaling, Guo et al. 2017; fit ``T`` on held-out data
            with :func:`~gyrodrop.fit_temperature`). Needs ``output="logits"``.

    Returns:
        A :class:`Prediction` of ``N`` examples (with the gyro ``pairing`` used). Warns
        when the model has no dropout layer, when a dropout layer is never called in the
        passes, when all passes are identical, and when ``pairing="auto"`` falls back
        to ``"index"``.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        >>> pred = gyrodrop.mc_predict(net, torch.randn(5, 4), samples=20, seed=1)
        >>> pred.mean.shape, bool((pred.mutual_info <= pred.entropy + 1e-6).all())
        (torch.Size([5, 3]), True)
    """
    owner = "mc_predict"
    temperature = check_inputs(owner, model, x, output, pairing, temperature)
    check_int(owner, "samples", samples, 1)
    seed = check_seed(owner, seed)
    net = unwrap_model(model)
    chunk = chunk_size(owner, batch_samples, samples, batch_rows(owner, x))

    gyro = gyro_layers(net)
    gyro_ids = {id(m) for m in gyro}
    dropouts = [m for m in net.modules() if isinstance(m, DROPOUTS)]
    attention = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention) and m.dropout > 0]
    depths = [m for m in net.modules() if isinstance(m, StochasticDepth)]
    wrappers = [
        m for m in net.modules() if isinstance(m, (StochasticDepthBlock, StochasticDepthLayer))
    ]
    others = [
        m
        for m in net.modules()
        if isinstance(m, SteppedModule)
        and id(m) not in gyro_ids
        and not isinstance(m, StochasticDepth)
    ]
    stochastic = bool(gyro or dropouts or attention or depths or others)
    if not stochastic:
        warnings.warn(
            f"{owner}: the model has no dropout-family layer; every pass is the same "
            "(mutual_info is 0)",
            UserWarning,
            stacklevel=2,
        )
    used, reason = resolve_pairing(owner, gyro, pairing) if gyro else (None, "")
    members = Members(gyro, used) if used is not None else None
    if members is not None:
        # Pass s uses member perm_r[s mod M] of round r = s // M: every member once
        # before any repeats.
        m_count = members.count
        mix = masks.mix_keys(seed, masks.TAG_MC_MEMBERS)
        rounds = [
            masks.seeded_permutation(mix, masks.TAG_MC_MEMBERS, r, m_count).tolist()
            for r in range((samples + m_count - 1) // m_count)
        ]
        draws = [rounds[s // m_count][s % m_count] for s in range(samples)]
    else:
        draws = list(range(samples))
    mc_key = masks.mix_keys(seed, masks.TAG_DEPTH)
    rows = batch_rows(owner, x)
    calls: dict[int, int] = {}
    single: dict[int, int] = {}  # rows each layer saw in a one-pass forward

    @contextlib.contextmanager
    def setup(start: int, ids: Sequence[int]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if members is not None:
                stack.enter_context(gyro_passes(members, ids, rows, calls, single))
            if depths:
                stack.enter_context(
                    mc_draws(depths, rows, start, mc_key, passes=len(ids), single=single)
                )
            yield

    active = [*dropouts, *attention, *depths, *wrappers, *others, *fused_parents(net)]
    needs_rng = bool(dropouts or attention or others)
    probe = bool(members is not None or depths)
    with (
        stochastic_eval(net, active),
        seeded_rng(seed, batch_device(x), needs_rng),
        count_calls(dropouts, calls),
    ):
        result = run_passes(
            owner, net, x, draws, chunk, output, setup, stochastic, probe, output_fn, temperature
        )
    warn_uncalled(owner, net, [*dropouts, *gyro], calls)
    result.pairing, result.pairing_reason = used, reason
    return result


def subnet_ensemble_predict(
    model: nn.Module,
    x: Batch,
    subnets: int | Sequence[int] | None = None,
    *,
    seed: int = 0,
    batch_subnets: int | None = None,
    output: Output = "logits",
    pairing: Pairing = "auto",
    output_fn: Callable[[Any], Tensor] | None = None,
    temperature: float = 1.0,
) -> Prediction:
    """The ensemble of the gyro subnetworks the model trained: one pass per subnetwork
    (all rows through it), probabilities averaged. Deterministic.

    Every other layer runs in eval mode (``nn.Dropout`` and stochastic depth off,
    BatchNorm on its running statistics); modes and step counters are restored.
    ``mutual_info`` is then the subnetworks' disagreement.

    Args:
        model: a classifier with at least one :class:`~gyrodrop.GyroDropout` or
            ``BlockGyroLinear`` layer, returning class scores ``(rows, C)``.
        x: inputs, ``(N, *)``, or a dict of keyword arguments (``model(**x)``, e.g.
            ``input_ids`` and ``attention_mask``) whose tensors share ``N``.
        subnets: ``None``: all members (``num_subnets``; with ``pairing="index"`` and
            layers of different sigma, the largest); an int ``n``: a seeded subset of
            ``n`` members; a sequence of member ids.
        seed: chooses the subset when ``subnets`` is an int.
        batch_subnets: subnetworks per forward; default: as many as fit in 2048 rows.
        output: ``"logits"``, ``"probs"`` or ``"regression"``, as in
            :func:`mc_predict`.
        pairing: ``"auto"``, ``"trained"`` or ``"index"`` (module docstring); the
            returned :class:`Prediction` says which was used and why.
        output_fn: maps the model's output to class scores, as in :func:`mc_predict`.
        temperature: divides the logits before the softmax, as in :func:`mc_predict`.

    Example:
        >>> import torch, gyrodrop
        >>> from torch import nn
        >>> net = nn.Sequential(
        ...     nn.Linear(4, 16),
        ...     nn.ReLU(),
        ...     gyrodrop.GyroDropout(0.5, 8, 2, steps_per_set=5),
        ...     nn.Linear(16, 3),
        ... )
        >>> a = gyrodrop.subnet_ensemble_predict(net, torch.ones(2, 4))
        >>> b = gyrodrop.subnet_ensemble_predict(net, torch.ones(2, 4))
        >>> bool(torch.equal(a.mean, b.mean))
        True
    """
    owner = "subnet_ensemble_predict"
    temperature = check_inputs(owner, model, x, output, pairing, temperature)
    seed = check_seed(owner, seed)
    net = unwrap_model(model)
    gyro = gyro_layers(net)
    if not gyro:
        raise ValueError(
            f"{owner}: the model has no GyroDropout or BlockGyroLinear layer, so it has no "
            "trained subnetworks; hint: gyrodrop.apply_gyro_dropout(model, ...) before "
            "training, or mc_predict for nn.Dropout models"
        )
    used, reason = resolve_pairing(owner, gyro, pairing)
    members = Members(gyro, used)
    m_count = members.count
    if subnets is None:
        chosen = list(range(m_count))
    elif isinstance(subnets, int) and not isinstance(subnets, bool):
        check_int(owner, "subnets", subnets, 1, m_count)
        perm = masks.seeded_permutation(seed, masks.TAG_SUBSET, 0, m_count)
        chosen = sorted(perm[:subnets].tolist())
    elif isinstance(subnets, Sequence) and not isinstance(subnets, (str, bytes)):
        bad = [
            j
            for j in subnets
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < m_count
        ]
        chosen = [int(j) for j in subnets if not isinstance(j, bool) and isinstance(j, int)]
        if not chosen or bad or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"{owner}: subnets must be distinct ints in [0, {m_count}), got {list(subnets)}"
            )
    else:
        raise ValueError(
            f"{owner}: subnets must be None, an int or a sequence of ints, got {subnets!r}"
        )
    rows = batch_rows(owner, x)
    chunk = chunk_size(owner, batch_subnets, len(chosen), rows, "batch_subnets")
    calls: dict[int, int] = {}
    single: dict[int, int] = {}

    def setup(start: int, ids: Sequence[int]) -> contextlib.AbstractContextManager[Any]:
        return gyro_passes(members, ids, rows, calls, single)

    with stochastic_eval(net, fused_parents(net)):
        result = run_passes(
            owner,
            net,
            x,
            chosen,
            chunk,
            output,
            setup,
            probe=True,
            output_fn=output_fn,
            temperature=temperature,
        )
    warn_uncalled(owner, net, gyro, calls)
    result.pairing, result.pairing_reason = used, reason
    return result
