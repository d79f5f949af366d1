"""The machinery shared by every GaLore optimizer: projected param groups, layer-wise stepping, trustworthy state.

A subclass implements one method, ``_update(p, group, state, grad)``, which sees the gradient already projected
(for projected groups) and applies its update through ``_add_update``, which projects back and scales.

Per-parameter state (all tensors or plain values, so ``torch.load(weights_only=True)`` reads a checkpoint):
``step`` (int, optimizer steps taken), ``project_left`` (bool: the side projected) and ``basis`` (the projection matrix) for
projected parameters, plus the subclass' moments.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from .projector import (
    PROJ_TYPES,
    SVD_METHODS,
    matrix_view,
    orthogonal_basis,
    project,
    project_back,
    projection_side,
)

logger = logging.getLogger(__name__)

GALORE_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")

# id(parameter) -> (weak ref to it, weak ref to the layer-wise optimizer stepping it from its gradient hook): two live
# ones would both step it. Kept beside the parameter, not on it, so models still pickle.
_LAYERWISE_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _layerwise_owner(p: torch.Tensor):
    entry = _LAYERWISE_OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _layerwise_hook_of(ref: weakref.ref):
    """The hook a layer-wise optimizer registers: it holds the optimizer weakly, so an optimizer that is dropped
    (replaced, rebuilt to load a checkpoint) stops stepping the parameters; its hooks become no-ops."""
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None and opt._layerwise is not None:
            opt._layerwise_hook(p)
    return hook


def _check_number(name: str, value, *, low=None, low_inclusive=True, high=None, high_inclusive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value!r}")


def _check_int(name: str, value, *, low: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_betas(betas, count: int = 2):
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise TypeError(f"betas must be a tuple of {count} floats, got {betas!r}")
    for i, b in enumerate(betas):
        _check_number(f"betas[{i}]", b, low=0.0, high=1.0)


def check_adam_group(group: dict) -> None:
    """lr, betas (2), eps and weight_decay of an Adam-family param group."""
    _check_number("lr", group["lr"], low=0.0)
    check_betas(group["betas"])
    _check_number("eps", group["eps"], low=0.0)
    _check_number("weight_decay", group["weight_decay"], low=0.0)


def _side(state: dict) -> str:
    # stored as a bool: torch's load_state_dict would iterate a str value into a generator
    return "left" if state["project_left"] else "right"


class GaLoreOptimizer(torch.optim.Optimizer):
    """Base class. A param group holding ``rank`` is projected; ``update_proj_gap`` (default 200), ``scale``
    (default 0.25), ``proj_type`` (default "std") and ``svd`` ("exact" or "randomized", default "exact") complete it.
    """

    #: whether subclasses accept projected groups (``AdamW8bit`` does not)
    _allows_projection = True

    def __init__(self, params, defaults: dict):
        self._param_names: dict[torch.Tensor, str] = {}
        self._layerwise: dict | None = None
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / pickle keep only defaults, state and param_groups (torch.optim.Optimizer.__getstate__):
        # rebuild the names; layer-wise hooks belong to the original's parameters and are not carried over.
        # load_state_dict also comes through here, on a live optimizer whose hooks stay.
        super().__setstate__(state)
        if not hasattr(self, "_layerwise"):
            self._layerwise = None
        self._param_names = {}
        for gi, group in enumerate(self.param_groups):
            self._name_params(group, gi)

    def _name_params(self, group: dict, gi: int) -> None:
        """Record each parameter's name (the group's ``param_names``, else its position) for messages."""
        names = group.get("param_names") or [f"param_groups[{gi}]['params'][{i}]" for i in range(len(group["params"]))]
        for p, name in zip(group["params"], names):
            self._param_names[p] = name

    # ------------------------------------------------------------------ param groups and their validation
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            self._name_params(group, gi)
            self._check_group(group, gi)
            if self._layerwise is not None:  # a group added in layer-wise mode steps from its hooks like the others
                for p in group["params"]:
                    self._layerwise_hook_param(p)
        except BaseException:  # a refused group is not kept: a later step() must not train with it
            self.param_groups.pop()
            for q in group["params"]:
                self._param_names.pop(q, None)
                if self._layerwise is not None and q in self._layerwise["handles"]:
                    self._layerwise_unhook(q, self._layerwise["handles"].pop(q))
            raise

    def _check_group(self, group: dict, gi: int) -> None:
        """The checks every param group passes, added or loaded: hyperparameters, and for a projected group that
        this optimizer projects and its parameters are matrices the rank fits."""
        try:
            self._validate_hyperparameters(group)
        except (TypeError, ValueError) as err:
            if str(err).startswith("param group"):
                raise
            raise type(err)(f"param group {gi}: {err}") from None
        if group.get("rank") is not None:
            if not self._allows_projection:
                raise ValueError(
                    f"{type(self).__name__} does not project; param group {gi} has rank={group['rank']!r} "
                    "(use the GaLore variant)"
                )
            self._validate_projected_group(group, gi)

    def _validate_hyperparameters(self, group: dict) -> None:
        """Subclasses check their own hyperparameters (lr, betas, ...) here."""

    def _validate_projected_group(self, group: dict, gi: int) -> None:
        group.setdefault("update_proj_gap", 200)
        group.setdefault("scale", 0.25)
        group.setdefault("proj_type", "std")
        group.setdefault("svd", "exact")
        rank = group["rank"]
        _check_int(f"param group {gi}: rank", rank, low=1)
        _check_int(f"param group {gi}: update_proj_gap", group["update_proj_gap"], low=1)
        _check_number(f"param group {gi}: scale", group["scale"], low=0.0, low_inclusive=False)
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"param group {gi}: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
        if group["svd"] not in SVD_METHODS:
            raise ValueError(f"param group {gi}: svd must be one of {SVD_METHODS}, got {group['svd']!r}")
        for p in group["params"]:
            name = self._param_names[p]
            if p.dim() < 2:
                raise ValueError(
                    f"parameter {name} has shape {tuple(p.shape)}: GaLore projects matrices only; put 1-D "
                    "parameters in a param group without 'rank'"
                )
            m, n = matrix_view(p).shape
            if rank > min(m, n):
                raise ValueError(
                    f"rank={rank} is larger than the smaller side of parameter {name} (shape {tuple(p.shape)}, "
                    f"smaller side {min(m, n)})"
                )

    @staticmethod
    def _is_projected(group: dict) -> bool:
        return group.get("rank") is not None

    # ------------------------------------------------------------------ the projection around one update
    def _needs_refresh(self, group: dict, state: dict) -> bool:
        return "basis" not in state or state["step"] % group["update_proj_gap"] == 0

    def _refresh_basis(self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor) -> None:
        if "project_left" not in state:
            state["project_left"] = projection_side(group["proj_type"], tuple(matrix_view(p).shape)) == "left"
        state["basis"] = orthogonal_basis(
            grad, group["rank"], _side(state), svd=group["svd"], seed=state["step"], name=self._param_names[p]
        )

    def _project(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the subclass update sees: projected (refreshing the basis when due) or as is."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        if not self._is_projected(group):
            return grad
        if p not in self._param_names or p.dim() < 2:
            raise ValueError(
                f"{type(self).__name__}: a projected param group (rank={group['rank']}) holds a tensor of shape "
                f"{tuple(p.shape)} that is not one of the matrices it was built with: a wrapper replaced its "
                "parameters (DeepSpeed ZeRO flattens them into 1-D partitions); GaLore cannot project those"
            )
        if self._needs_refresh(group, state):
            self._refresh_basis(p, group, state, grad)
        return project(grad, state["basis"], _side(state))

    def _add_update(self, target: torch.Tensor, group: dict, state: dict, update: torch.Tensor, alpha: float) -> None:
        """``target += alpha * scale * back(update)`` for projected groups, ``target += alpha * update`` otherwise."""
        if self._is_projected(group):
            update = (project_back(update, state["basis"], _side(state)) * group["scale"]).view(target.shape)
        target.add_(update, alpha=alpha)

    def _refuse_sparse(self, p: torch.Tensor) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({self._param_names[p]})")

    def _step_param(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] += 1
        self._update(p, group, state, grad)

    def _update(self, p: torch.Tensor, group: dict, state: dict, grad: torch.Tensor) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimizer step. In layer-wise mode, finishes whatever the gradient hooks left pending."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layerwise is not None:
            self._layerwise_flush()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._refuse_sparse(p)
                self._step_param(p, group, self._project(p, group, p.grad))
        return loss

    # ------------------------------------------------------------------ state you can trust
    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping every state tensor's own dtype (torch casts floating state to the parameter's dtype, which
        would turn fp32 moments of a bf16 parameter into bf16)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            names, here = saved.get("param_names"), group.get("param_names")
            if names is not None and here is not None and list(names) != list(here):
                bad = next((a, b) for a, b in itertools.zip_longest(names, here) if a != b)
                raise ValueError(f"state_dict param group {gi} lists parameters {list(names)[:4]}... in another "
                                 f"order or set than this optimizer ({here[:4]}...): its state for {bad[0]!r} would "
                                 f"land on {bad[1]!r}; build the optimizer with the same named parameters")
        before = {"state": self.state, "param_groups": self.param_groups}
        super().load_state_dict(state_dict)
        try:  # the saved groups replace the live ones: they pass the checks add_param_group makes
            for gi, group in enumerate(self.param_groups):
                self._check_group(group, gi)
        except (TypeError, ValueError) as err:
            self.__setstate__(before)  # refused: the optimizer stays as it was
            raise type(err)(f"state_dict: {err}") from None
        index_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                index_to_param[index] = p
        for index, values in saved_state.items():
            p = index_to_param[index]
            for key, value in values.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        if self._layerwise is not None:
            self._layerwise["pending"].clear()
            self._layerwise["count"].clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients; in layer-wise mode also what the hooks accumulated since the last update (projected
        sums and backward counts), as a plain optimizer's accumulated ``.grad`` is cleared: a microbatch thrown away
        with ``zero_grad()`` must not reach the update, nor count toward ``accumulation_steps``."""
        super().zero_grad(set_to_none)
        if self._layerwise is not None:
            self._layerwise["pending"].clear()
            self._layerwise["count"].clear()

    # ------------------------------------------------------------------ layer-wise mode
    def enable_layerwise(
        self, accumulation_steps: int = 1, max_grad_norm: float | None = None, distributed: bool | None = None
    ) -> None:
        """Step each parameter from its post-accumulate-grad hook so full gradients are never all held at once.

        Across the ``accumulation_steps`` backward passes of one optimizer step each projected parameter accumulates
        its *projected* gradient (exact: the basis is fixed within a step) and frees its full gradient. On steps that
        refresh the basis its full gradient is kept until the last microbatch, because the SVD needs the whole sum.
        With ``accumulation_steps`` = 1 nothing is held. The parameter is updated in its hook on the last
        microbatch, or in ``step()`` when ``max_grad_norm`` is set or under ``distributed`` (then ``step()``
        reduces, clips and updates every parameter in a fixed order).

        ``max_grad_norm`` clips by the global norm of the gradients the update sees: projected gradients for
        projected parameters, full ones for the rest (‖Pᵀ G‖ <= ‖G‖, so it clips less than full-gradient clipping).

        ``distributed`` (default: whether a process group of more than one rank is initialised) all-reduces
        (averages) each accumulated gradient in ``step()``: the full gradient before an SVD, the projected one
        otherwise (exact, the basis is identical on every rank). Run every backward under ``DDP.no_sync()`` (or do
        not wrap the model in DDP) so DDP does not reduce as well.

        ``step()`` must still be called once per optimizer step; ``zero_grad()`` drops what was accumulated since the
        last update, as it does a plain optimizer's gradients.
        """
        _check_int("accumulation_steps", accumulation_steps, low=1)
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool or None, got {distributed!r}")
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group "
                             "(init_process_group first), or pass distributed=False")
        self.disable_layerwise()
        for key in [k for k, (param, opt) in _LAYERWISE_OWNERS.items() if param() is None or opt() is None]:
            del _LAYERWISE_OWNERS[key]  # entries of parameters or optimizers that are gone
        self._layerwise = {
            "accumulation_steps": accumulation_steps,
            "max_grad_norm": max_grad_norm,
            "distributed": distributed,
            "handles": {},  # parameter -> its hook's handle
            "pending": {},  # parameter -> fp32 sum of projected gradients this step
            "count": {},  # parameter -> backward passes seen this step
        }
        for group in self.param_groups:
            for p in group["params"]:
                self._layerwise_hook_param(p)
        logger.info(
            "GaLore layer-wise mode: accumulation_steps=%d, max_grad_norm=%s, distributed=%s",
            accumulation_steps, max_grad_norm, distributed,
        )

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Tell layer-wise mode how many backward passes make one optimizer step."""
        if self._layerwise is None:
            raise RuntimeError("set_accumulation_steps needs layer-wise mode; call enable_layerwise() first")
        _check_int("accumulation_steps", accumulation_steps, low=1)
        self._layerwise["accumulation_steps"] = accumulation_steps

    def disable_layerwise(self) -> None:
        """Remove the hooks (finishing any pending step first). Under ``distributed`` it is a collective, like
        ``step()``: every rank calls it."""
        if self._layerwise is None:
            return
        self._layerwise_flush()  # under ``distributed`` a collective, as step() is: call it on every rank
        for p, handle in self._layerwise["handles"].items():
            self._layerwise_unhook(p, handle)
        self._layerwise = None

    def _layerwise_unhook(self, p: torch.Tensor, handle) -> None:
        """Remove ``p``'s layer-wise hook and this optimizer's claim on it."""
        handle.remove()
        if _layerwise_owner(p) is self:
            del _LAYERWISE_OWNERS[id(p)]

    def _layerwise_hook_param(self, p: torch.Tensor) -> None:
        """Register the layer-wise hook on ``p`` once (a frozen parameter gets it if it is unfrozen later: the next
        ``step()`` finds its gradient and hooks it from then on)."""
        lw = self._layerwise
        if p.requires_grad and p not in lw["handles"]:
            other = _layerwise_owner(p)
            if other is not None and other is not self and other._layerwise is not None \
                    and p in other._layerwise["handles"]:
                raise ValueError(f"parameter {self._param_names.get(p, tuple(p.shape))} is already stepped by another "
                                 f"live layer-wise optimizer ({type(other).__name__}); call its disable_layerwise() "
                                 "or drop it first")
            lw["handles"][p] = p.register_post_accumulate_grad_hook(_layerwise_hook_of(weakref.ref(self)))
            _LAYERWISE_OWNERS[id(p)] = (weakref.ref(p), weakref.ref(self))

    def _group_of(self, p: torch.Tensor) -> dict:
        """``p``'s param group as it is now: ``load_state_dict`` replaces the group dicts (the loaded lr, a
        scheduler's later changes), so a group is never cached."""
        index = self._layerwise.setdefault("group_index", {})
        gi = index.get(p)
        if gi is None or gi >= len(self.param_groups) or not any(q is p for q in self.param_groups[gi]["params"]):
            index.clear()
            for i, group in enumerate(self.param_groups):
                for q in group["params"]:
                    index[q] = i
            gi = index[p]
        return self.param_groups[gi]

    @property
    def layerwise(self) -> bool:
        return self._layerwise is not None

    @torch.no_grad()
    def _layerwise_hook(self, p: torch.Tensor) -> None:
        lw = self._layerwise
        if p.grad is None:
            return
        self._refuse_sparse(p)
        group = self._group_of(p)
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        lw["count"][p] = count = lw["count"].get(p, 0) + 1
        if self._is_projected(group) and not self._needs_refresh(group, state):
            low = project(p.grad, state["basis"], _side(state))
            acc = lw["pending"].get(p)
            if acc is None:
                lw["pending"][p] = low.float() if low.dtype != torch.float32 else low
            else:
                acc.add_(low)
            p.grad = None
        # otherwise autograd keeps summing into p.grad (unprojected parameter, or a step that refreshes the basis)
        if count >= lw["accumulation_steps"] and lw["max_grad_norm"] is None and not lw["distributed"]:
            self._layerwise_apply(p, group, self._layerwise_gradient(p, group))

    def _layerwise_gradient(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The (reduced) gradient the update sees, projected when the group is projected."""
        lw = self._layerwise
        pending = lw["pending"].get(p)
        state = self.state[p]
        world = dist.get_world_size() if lw["distributed"] else 1
        if pending is not None:
            if world > 1:
                dist.all_reduce(pending)
                pending.div_(world)
            return pending
        grad = p.grad
        if world > 1:
            dist.all_reduce(grad)
            grad.div_(world)
        return self._project(p, group, grad)

    def _layerwise_apply(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        lw = self._layerwise
        self._step_param(p, group, grad)
        p.grad = None
        lw["pending"].pop(p, None)
        lw["count"].pop(p, None)

    @torch.no_grad()
    def _layerwise_flush(self) -> None:
        lw = self._layerwise
        if lw["distributed"] and dist.get_world_size() > 1:
            todo = self._layerwise_todo_everywhere()
        else:
            todo = [
                (p, group)
                for group in self.param_groups
                for p in group["params"]
                if p in lw["pending"] or p.grad is not None
            ]
        if not todo:
            return
        for p, _ in todo:  # a parameter unfrozen since enable_layerwise: updated here, and hooked from now on
            self._layerwise_hook_param(p)
        grads = [self._layerwise_gradient(p, group) for p, group in todo]
        if lw["max_grad_norm"] is not None:
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            )
            coef = torch.clamp(lw["max_grad_norm"] / (total + 1e-6), max=1.0)
            grads = [g * coef.to(g.dtype) for g in grads]
        for (p, group), g in zip(todo, grads):
            self._layerwise_apply(p, group, g)

    def _layerwise_todo_everywhere(self) -> list:
        """Under ``distributed``: the parameters any rank has a gradient for, in one order on every rank, each with a
        zero gradient where this rank has none (a parameter unused here: routing, conditional compute), so the
        per-parameter all-reduces pair up the same tensors on every rank, as DDP's find_unused_parameters does."""
        lw = self._layerwise
        params = [(p, group) for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return []
        has = torch.tensor([1.0 if (p in lw["pending"] or p.grad is not None) else 0.0 for p, _ in params],
                           device=params[0][0].device)
        dist.all_reduce(has)
        todo = []
        for (p, group), n in zip(params, has.tolist()):
            if n == 0:
                continue
            if p not in lw["pending"] and p.grad is None:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if self._is_projected(group) and not self._needs_refresh(group, state):
                    lw["pending"][p] = project(torch.zeros_like(p, dtype=torch.float32), state["basis"], _side(state))
                else:
                    p.grad = torch.zeros_like(p)
            todo.append((p, group))
        return todo
