"""fxcache for diffusers pipelines: ``enable`` / ``disable`` and DeepCache id translation.

This adapter knows about pipelines (``pipe.unet``, ``pipe.scheduler``) by duck typing; it does not
import diffusers, and the core (capture, passes, runtime) knows nothing of it.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from fxcache.adapters import controlnet as _controlnet
from fxcache.compile import CompileSpec
from fxcache.config import CacheConfig
from fxcache.errors import add_note
from fxcache.generations import Decision
from fxcache.plan import CachePlan
from fxcache.runtime import CachedModule, StepInfo
from fxcache.schedule import ScheduleLike

__all__ = ["enable", "disable", "swap_unet", "branch_from_deepcache_id"]


class _SchedulerSteps:
    """Step numbering as DeepCache's reference helper does it, without a device sync per step.

    The reference numbers a call by the position of its timestep's *first occurrence* in
    ``scheduler.timesteps`` (PNDM and Heun repeat timesteps), relative to the generation's first
    call, and reads the timestep tensor to do so (``.item()``, a device sync). This reads
    ``scheduler.timesteps`` to the host once per generation (a new generation is a new ``timesteps``
    tensor: every pipeline call runs ``set_timesteps``) and then finds each call's position without
    reading its timestep (:meth:`position`):

    - a timestep that is an element of ``scheduler.timesteps`` (``for t in timesteps``, as every
      diffusers loop passes it; also ``t.expand(n)`` of one): from its storage offset, metadata only;
    - a Python number or a CPU tensor: by value (no device to wait for);
    - otherwise (a device tensor the loop made, such as ``t.to(dtype)``): calls are counted, and a
      call given the *same tensor object* as the previous call is the same step (a second call at
      one timestep, as a callback or a guidance method makes).

    So two calls at one timestep are one step, as in the reference. A position lower than the
    previous call's starts a new generation (a loop that denoises twice over one ``set_timesteps``),
    as does, when counting, a call past the last timestep; a counted generation starts at
    ``scheduler.begin_index`` (where img2img enters the schedule).
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self._timesteps: torch.Tensor | None = None
        self._first: list[int] = []  # position -> position of the first occurrence of its value
        self._by_value: dict[float, int] = {}  # value -> position of its first occurrence
        self._base = 0  # the position of the generation's first call
        self._last: tuple[int, Any] | None = None  # (position, timestep argument) of the previous call
        self._call_timestep: contextvars.ContextVar[Any] = contextvars.ContextVar(
            f"fxcache_call_timestep_{id(self):x}", default=None
        )

    @contextmanager
    def calling(self, timestep: Any) -> Iterator[None]:
        """Number the calls made inside the block (the runtime asks :meth:`__call__`) as calls given ``timestep``."""
        token = self._call_timestep.set(timestep)
        try:
            yield
        finally:
            self._call_timestep.reset(token)

    def __call__(self) -> StepInfo | None:
        return self.step_of(self._call_timestep.get())

    def step_of(self, timestep: Any) -> StepInfo | None:
        """The step of a call given ``timestep`` (advances the numbering); None: not a scheduler this can read."""
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or len(timesteps) == 0:
            return None  # not a scheduler we can read: the module's own rule applies
        if timesteps is not self._timesteps:  # set_timesteps ran: a new generation
            values = timesteps.tolist()
            self._by_value = {}
            self._first = [self._by_value.setdefault(v, i) for i, v in enumerate(values)]
            self._timesteps, self._last = timesteps, None
        pos = self.position(timestep)
        last = self._last
        if pos is not None:
            new = last is None or pos < last[0]
        elif last is not None and timestep is not None and timestep is last[1]:
            pos, new = last[0], False  # the same tensor object again: the same step
        else:
            pos = last[0] + 1 if last is not None else -1
            new = not 0 <= pos < len(self._first)  # the first call, or past the last timestep: a loop started over
            if new:
                begin = getattr(scheduler, "begin_index", None) or 0
                pos = begin if 0 <= begin < len(self._first) else 0
        if new:
            self._base = pos
        self._last = (pos, timestep)
        total = max(len(self._first) - self._base, 1)  # the denoising calls this generation makes
        return StepInfo(new, self._first[pos] - self._first[self._base], total)

    def position(self, timestep: Any) -> int | None:
        """Where ``timestep`` is in the scheduler's timesteps (the first occurrence of its value when found by
        value), without a device read; None when that cannot be told."""
        timesteps = self._timesteps
        assert timesteps is not None
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0 or timestep.device != timesteps.device:
                return None
            if timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr():
                # A view of the timesteps (an element, or one expanded): its offset says which element.
                pos, rest = divmod(timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0) or 1)
                if rest == 0 and 0 <= pos < len(self._first):
                    return pos
            if timestep.device.type != "cpu" or timestep.is_complex():
                return None
            timestep = timestep.reshape(-1)[0].item()  # on the host already: no sync
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            return self._by_value.get(timestep)
        return None


_UNKNOWN = object()  # decide_ahead's predicted signature when no deep feature is cached: equals none


class _PipelineUNet(CachedModule):
    """A CachedModule that, when capturing or compiling fails, puts the pipeline's UNet back first.

    It also lets a ControlNet hook (:mod:`fxcache.adapters.controlnet`) take its next step decision
    ahead of the call (:meth:`decide_ahead`): the call then consumes that decision instead of taking one.
    """

    def __init__(self, unet: torch.nn.Module, config: CacheConfig, pipe: Any) -> None:
        super().__init__(unet, config)
        self.step_source = _SchedulerSteps(pipe)
        self._pipe_ref = weakref.ref(pipe)
        self.fxcache_controlnet: _controlnet.ControlNetStep | None = None  # kept, with its graphs, across re-enables

    def in_pipeline(self, controlnet: Any = None) -> bool:
        """Whether this module is its pipeline's ``unet`` now (not swapped out by :func:`swap_unet` or disabled),
        and, when given, ``controlnet`` its ``controlnet``."""
        pipe = self._pipe_ref()
        if pipe is None or pipe.__dict__.get("unet") is not self:
            return False
        return controlnet is None or pipe.__dict__.get("controlnet") is controlnet

    def decide_ahead(self, args: tuple, kwargs: dict[str, Any]) -> tuple[bool, bool, CachePlan | None]:
        """Decide now whether the next call is full, advancing the step state exactly as that call would.

        For a module called right before this one with the same timestep (a ControlNet). The next call
        consumes the decision. Returns (new generation?, full?) and the plan whose shallow graph a shallow step
        will run.
        Deciding again before that call drops the earlier decision (its call never came). The decision is
        kept in the generation's state (``fxcache_state.ahead``, a :class:`~fxcache.generations.Decision`), so
        threads sharing the module keep theirs apart.
        """
        st = self.fxcache_state
        st.ahead = None
        predicted = st.signature if st.signature is not None else _UNKNOWN
        with self._numbering(args, kwargs):
            new_generation, full = CachedModule._decide(self, predicted, args, kwargs)
        st.ahead = Decision(new_generation, full, predicted)
        return new_generation, full, (None if full else self.plans.get(predicted))

    def _numbering(self, args: tuple, kwargs: dict[str, Any]) -> AbstractContextManager[None]:
        # The step source numbers a call by its timestep argument (the ControlNet's takes the same one).
        source = self.step_source
        if isinstance(source, _SchedulerSteps):
            return source.calling(self._timestep.get(args, kwargs))
        return nullcontext()

    def ahead_pruned(self) -> None:
        """The caller of :meth:`decide_ahead` skipped inputs only a full step reads: the next call must be shallow."""
        ahead = self.fxcache_state.ahead
        if ahead is not None:
            ahead.pruned = True

    def drop_ahead(self) -> None:
        self.fxcache_state.ahead = None

    def _decide(self, sig: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[bool, bool]:
        st = self.fxcache_state
        ahead, st.ahead = st.ahead, None
        if ahead is None:
            with self._numbering(args, kwargs):
                return super()._decide(sig, args, kwargs)
        if sig == ahead.signature:
            return ahead.new_generation, ahead.full
        # The inputs' signature differs from the cached feature's: this is a new generation, a full step.
        if not ahead.full and ahead.pruned:
            st.reset()
            raise RuntimeError(
                "fxcache: the ControlNet ran pruned for a shallow U-Net step, but the U-Net's inputs no longer "
                "match the cached feature (shapes, dtypes or arguments changed within a generation), which needs "
                "a full step. Call fxcache.enable(pipe, ..., prune_controlnet=False) to run the whole ControlNet "
                "every step."
            )
        st.step, st.last_full = 0, True
        st.generation_full_steps = st.generation_shallow_steps = 0
        return True, True

    def __getstate__(self) -> dict[str, Any]:
        # A copy (of the pipeline, or of this module) is not tied to the original pipeline's scheduler:
        # it numbers steps as a bare module does until fxcache.enable is called on its pipeline.
        state = super().__getstate__()
        state["step_source"], state["_pipe_ref"] = None, _no_pipe
        return state

    def _setup_failed(self, error: BaseException) -> None:
        pipe = self._pipe_ref()
        if pipe is not None and pipe.__dict__.get("unet") is self:
            disable(pipe)  # the error leaves the pipeline as it was before enable()
            add_note(error, "fxcache: the pipeline's original UNet was put back (fxcache.enable undone).")


def _no_pipe() -> None:
    return None


class _SaveAsPlain:
    """``pipe.save_pretrained`` while enabled: the pipeline saved with its real UNet, as if not enabled.

    diffusers saves a component by its class; a CachedModule is none it knows, so without this the
    UNet would be skipped and the pipeline's config rewritten to ``(None, None)``.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.pipe
        unet = pipe.unet
        original = unet.model if isinstance(unet, CachedModule) else unet
        net = pipe.__dict__.get("controlnet")
        with swap_unet(pipe, original), _swapped(pipe, "controlnet", _controlnet.plain(net)):
            return type(pipe).save_pretrained(pipe, *args, **kwargs)


@contextmanager
def _swapped(pipe: Any, name: str, value: Any) -> Iterator[None]:
    # Without DiffusionPipeline.__setattr__, which would record the value in pipe.config.
    if name not in pipe.__dict__:
        yield
        return
    previous = pipe.__dict__[name]
    object.__setattr__(pipe, name, value)
    try:
        yield
    finally:
        object.__setattr__(pipe, name, previous)


def _set_unet(pipe: Any, unet: torch.nn.Module) -> None:
    # DiffusionPipeline.__setattr__ would rewrite pipe.config's unet entry to point at fxcache;
    # the swap is temporary, so the pipeline's config (and save_pretrained) must not see it.
    object.__setattr__(pipe, "unet", unet)


@contextmanager
def swap_unet(pipe: Any, unet: torch.nn.Module) -> Iterator[Any]:
    """Run ``pipe`` with ``unet`` in place of ``pipe.unet`` inside the block; the previous one is back after it.

    ``pipe.config`` is not touched (diffusers' own ``pipe.unet = ...`` would record the new module
    there, and ``save_pretrained`` with it). For comparing a plain, a compiled or a cached UNet on one
    pipeline. Yields ``pipe``.

    Example:
        >>> from types import SimpleNamespace
        >>> pipe = SimpleNamespace(unet="original")
        >>> with swap_unet(pipe, "other"):
        ...     print(pipe.unet)
        other
        >>> pipe.unet
        'original'
    """
    previous = pipe.unet
    _set_unet(pipe, unet)
    try:
        yield pipe
    finally:
        _set_unet(pipe, previous)


def enable(
    pipe: Any,
    branch: int = 0,
    interval: int | None = None,
    *,
    schedule: ScheduleLike | None = None,
    compile: CompileSpec = False,
    prune_controlnet: bool = True,
) -> Any:
    """Make ``pipe.unet`` run DeepCache; returns ``pipe``.

    Step numbering follows the reference helper (``DeepCacheSDHelper``) exactly: a call's step is the
    position of its timestep's first occurrence in the scheduler's timesteps, counted from the
    generation's first call, so two calls at one timestep are one step. Unlike the reference, which
    reads the timestep tensor every step (a device sync), fxcache reads the scheduler's timesteps once
    per generation and places a call by its timestep's storage offset in them (how pipelines pass it);
    only a device tensor that is not an element of ``scheduler.timesteps`` is placed by counting calls
    (the same tensor object again being the same step). See :class:`_SchedulerSteps`.
    A schedule that needs the number of steps (``nonuniform``) gets the number of denoising calls
    the pipeline will make. ``interval``, ``schedule`` and ``compile`` are as in
    :func:`fxcache.transform`. Calling ``enable`` again on an enabled pipeline replaces the settings
    through :meth:`CachedModule.configure` on the same module, so graphs already built for the same
    branch and compile setting are kept (changing only ``interval`` recaptures nothing).
    ``pipe.config`` is left untouched, ``pipe.save_pretrained`` saves the original UNet as the plain
    pipeline would, and :func:`disable` puts the original UNet object back.

    On a pipeline with a ControlNet (``pipe.controlnet``, one or a ``MultiControlNetModel``), shallow
    steps run only the part of the ControlNet whose residuals the shallow U-Net reads (for branch 0 the
    first of its 13 residuals), with the same latents as running it whole; ``prune_controlnet=False``
    runs it whole every step, as the reference helper does. ``pipe.controlnet`` is then the pipeline's own view
    of the ControlNet (same class, same state; the ControlNet object, which other pipelines may share, is not
    changed) until :func:`disable`. See :mod:`fxcache.adapters.controlnet`.

    Example:
        >>> import fxcache
        >>> pipe = fxcache.enable(pipe, branch=0, interval=3)        # doctest: +SKIP
        >>> latents = pipe(prompt_embeds=emb, output_type="latent")  # doctest: +SKIP
        >>> fxcache.disable(pipe)                                    # doctest: +SKIP
    """
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, _PipelineUNet) and unet._pipe_ref() is pipe:
        unet.configure(branch=branch, interval=interval, schedule=schedule, compile=compile)
        _hook_controlnet(pipe, unet, prune_controlnet)
        return pipe
    if isinstance(unet, CachedModule):
        unet = unet.model
    if not isinstance(unet, torch.nn.Module):
        raise ValueError(
            f"{type(pipe).__name__} has no .unet module to cache (found {type(unet).__name__}). "
            "fxcache.enable works on U-Net pipelines; for another model call fxcache.transform(model) directly."
        )
    config = CacheConfig(branch=branch, interval=interval, schedule=schedule, compile=compile)
    cached = _PipelineUNet(unet, config, pipe)
    _set_unet(pipe, cached)
    if hasattr(type(pipe), "save_pretrained"):
        object.__setattr__(pipe, "save_pretrained", _SaveAsPlain(pipe))
    _hook_controlnet(pipe, cached, prune_controlnet)
    return pipe


def _hook_controlnet(pipe: Any, unet: _PipelineUNet, prune: bool) -> None:
    # The pipeline's controlnet becomes its own view of the ControlNet (fxcache.adapters.controlnet.view), set
    # with object.__setattr__ as the U-Net is: the ControlNet object, which other pipelines may share, is never
    # changed, and the pipeline's config still names the ControlNet.
    current = pipe.__dict__.get("controlnet")
    net = _controlnet.plain(current)
    if not isinstance(net, torch.nn.Module):
        return
    if not prune:
        if current is not net:
            object.__setattr__(pipe, "controlnet", net)
        return
    step = unet.fxcache_controlnet
    if step is None or step.net is not net:  # kept, with its graphs, while the pipeline keeps this ControlNet
        step = unet.fxcache_controlnet = _controlnet.ControlNetStep(net, unet)
    if _controlnet.installed(current) is not step:
        object.__setattr__(pipe, "controlnet", _controlnet.view(net, step))


def disable(pipe: Any) -> Any:
    """Put back the UNet and the ControlNet that :func:`enable` replaced (the very same objects); a no-op on a
    pipeline that is not enabled."""
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, CachedModule):
        _set_unet(pipe, unet.model)
    if isinstance(vars(pipe).get("save_pretrained"), _SaveAsPlain):
        del pipe.__dict__["save_pretrained"]
    net = pipe.__dict__.get("controlnet")
    if _controlnet.installed(net) is not None:
        object.__setattr__(pipe, "controlnet", _controlnet.plain(net))
    return pipe


def branch_from_deepcache_id(unet: torch.nn.Module, cache_branch_id: int) -> int:
    """The fxcache branch that matches DeepCache's ``cache_branch_id`` on a diffusers U-Net.

    The reference helper reads its id as ``block = id // 3, layer = id % 3`` and keeps everything
    from that layer of that down block (and its up-path twin) in the cache. Counted in skips, with
    ``L_j`` layers and ``d_j`` downsamplers in down block ``j``, that is skip
    ``sum(L_j + d_j for j < block) + min(layer, L_block)``: equal to the id when every block has two
    layers (SD1.x, SD2.x, SD-XL), different otherwise.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> block = NS(resnets=[0], downsamplers=[0])                 # one layer per block
        >>> branch_from_deepcache_id(NS(down_blocks=[block, block]), 5)
        3
    """
    blocks = list(unet.down_blocks)
    block, layer = divmod(cache_branch_id, 3)
    if not 0 <= block < len(blocks):
        raise ValueError(
            f"cache_branch_id={cache_branch_id} is out of range: this U-Net has {len(blocks)} down blocks, "
            f"so DeepCache ids go from 0 to {3 * len(blocks) - 1}"
        )
    skips = 0
    for b in blocks[:block]:
        skips += len(b.resnets) + len(getattr(b, "downsamplers", None) or [])
    return skips + min(layer, len(blocks[block].resnets))
