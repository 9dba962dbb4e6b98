"""Ahead-of-time deployment: ``fxcache.export`` writes one package, ``fxcache.load`` runs it without the model's code.

A package is one ``.pt2`` file (PyTorch's PT2 archive, a zip) that holds

* the full and the shallow graph, each compiled by AOTInductor for the example inputs' signature
  (C++ kernels on CPU, CUDA kernels on CUDA), under the model names ``full`` and ``shallow``. The cache
  is an explicit input and output: ``full(tensors) -> (*outputs, deep)`` and
  ``shallow(*tensors, deep) -> outputs`` (a buffer bound to a graph would be packaged as a constant);
* the weights once: both graphs are compiled with their weights kept out of the shared libraries
  (``aot_inductor.package_constants_in_so=False``) and written as ``pickle_weights``, which PyTorch's
  packager deduplicates by storage, so a weight both graphs read is stored once and, at load, one tensor
  serves both runners;
* ``extra/fxcache.json``: the format version, the torch and fxcache versions, the device, the branch and
  where it cuts, the schedule, and the input/output structure, each input's strides included (see
  :func:`read_metadata`).

:func:`load` checks the metadata before it loads any code, then returns a :class:`PackagedModule`: a
:class:`~fxcache.CachedModule` whose two graphs are the packaged ones, so it runs the same schedule and
generation rules as the in-process transform, called exactly like the original model.

The kernels are compiled for contiguous inputs and index memory with those strides, checking none of them; a
loaded package copies a tensor of another layout (channels_last, transposed, sliced, a stride-0 ``expand``,
a misaligned start) into the compiled one before its runner sees it, so every valid call gives the contiguous
call's result.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils import _pytree as pytree

from fxcache import backends
from fxcache._version import __version__
from fxcache.capture import Signature, flatten_call
from fxcache.config import CacheConfig
from fxcache.errors import CaptureError
from fxcache.gate import TRACING
from fxcache.plan import CachePlan, plan
from fxcache.runtime import CachedModule, _Call, _Entry, _TimestepArg
from fxcache.schedule import ExplicitSchedule, NonUniform, Schedule, Uniform

__all__ = ["PackageError", "PackagedModule", "export", "load", "read_metadata"]

FORMAT = "fxcache-aot"
FORMAT_VERSION = 2  # 2: each tensor input and the cache record their compiled strides
_READS = (1, 2)  # format 1 packages were compiled from their example inputs as given, read as contiguous
_META = "fxcache.json"  # an extra file of the archive: extra/fxcache.json
_AOTI_OPTIONS = {
    "aot_inductor.package": True,
    # Weights out of the .so files, pickled once per storage: the packager deduplicates the weights the
    # two graphs share (grouped by storage), and the loader gives both runners the same tensors.
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
}
_CONST_TYPES = (type(None), bool, int, float, str)
_ALIGN = 16  # bytes: Inductor assumes inputs start this aligned when the examples did (torch._inductor.utils.ALIGNMENT)


class PackageError(RuntimeError):
    """A package cannot be loaded here, or a loaded package was called with other inputs than it was built for.

    The message says what differs and what to do (usually: export again on this machine, or for these inputs).
    """


# -- export -----------------------------------------------------------------------------------------------


def _schedule_json(schedule: Schedule) -> dict[str, Any]:
    if isinstance(schedule, Uniform):
        return {"kind": "uniform", "interval": schedule.interval}
    if isinstance(schedule, NonUniform):
        return {
            "kind": "nonuniform",
            "interval": schedule.interval,
            "center": schedule.center,
            "power": schedule.power,
            "reference": schedule.reference,
        }
    if isinstance(schedule, ExplicitSchedule):
        return {"kind": "full_steps", "steps": sorted(schedule.steps)}
    raise ValueError(
        f"fxcache.export cannot save the schedule {schedule!r}: a package holds uniform, nonuniform and "
        "full_steps schedules (a Python function is code, which a package does not carry). For a fixed number "
        "of steps T, configure schedule=fxcache.full_steps(schedule.full_steps(T)) and export again."
    )


def _schedule_from_json(data: Mapping[str, Any]) -> Schedule:
    kind = data["kind"]
    if kind == "uniform":
        return Uniform(int(data["interval"]))
    if kind == "nonuniform":
        return NonUniform(int(data["interval"]), data["center"], data["power"], bool(data["reference"]))
    if kind == "full_steps":
        return ExplicitSchedule(frozenset(int(s) for s in data["steps"]))
    raise PackageError(f"unknown schedule kind {kind!r} in the package")


def _leaf_names(args: tuple, kwargs: Mapping[str, Any]) -> list[str]:
    """Readable names of a call's leaves, in order: ``args[0]``, ``encoder_hidden_states``, ``added['x']``."""
    paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
    names = []
    for path, _leaf in paths:
        first, second, *rest = path
        tail = pytree.keystr(tuple(rest)) if rest else ""
        if getattr(first, "idx", 0) == 0:
            names.append(f"args[{second.idx}]{tail}")
        else:
            names.append(f"{second.key}{tail}")
    return names


def _leaf_json(leaf: Any, name: str) -> dict[str, Any]:
    if isinstance(leaf, torch.Tensor):
        return {
            "kind": "tensor",
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype).removeprefix("torch."),
            "device": str(leaf.device),
            "stride": list(leaf.stride()),
        }
    if isinstance(leaf, _CONST_TYPES):
        return {"kind": "const", "type": type(leaf).__name__, "value": leaf}
    raise ValueError(
        f"fxcache.export cannot save the input {name} ({type(leaf).__name__}): a package takes tensors and "
        "constants (None, bool, int, float, str) as inputs"
    )


def _describe(leaf: Mapping[str, Any]) -> str:
    if leaf["kind"] == "tensor":
        return f"a {leaf['dtype']} tensor of shape {tuple(leaf['shape'])} on {leaf['device']}"
    return f"{leaf['value']!r}"


def _signature_leaf(leaf: Mapping[str, Any]) -> Any:
    # The Signature leaf descriptor capture.flatten_call makes for such a leaf (see capture._describe_leaf).
    if leaf["kind"] == "tensor":
        dtype = getattr(torch, leaf["dtype"])
        return ("tensor", tuple(leaf["shape"]), dtype, torch.device(leaf["device"]), torch.strided)
    types = {t.__name__: t for t in _CONST_TYPES}
    return ("const", types[leaf["type"]], leaf["value"])


def _builtin_spec(spec: pytree.TreeSpec) -> bool:
    """Whether ``spec`` uses only containers any Python has (so it can be rebuilt without the model's code)."""
    if spec.is_leaf():
        return True
    return spec.type in (tuple, list, dict) and all(_builtin_spec(c) for c in spec.children_specs)


class _TensorLeaves(torch.nn.Module):
    """A graph called with its tensor leaves only; the constant leaves are put back in their places."""

    def __init__(self, gm: torch.nn.Module, leaves: list[Any]) -> None:
        super().__init__()
        self.gm = gm
        self._slots = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        self._tensor_slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        # Tensors past the call's own (the shallow graph's cached feature) follow its leaves.
        leaves = list(self._slots)
        for i, t in zip(self._tensor_slots, tensors, strict=False):
            leaves[i] = t
        return self.gm(*leaves, *tensors[len(self._tensor_slots) :])


def _aot_files(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    from torch._inductor import aot_compile

    with TRACING.exclusive(), torch.no_grad():  # export traces process-wide: no fxcache graph runs meanwhile
        ep = torch.export.export(module, inputs, strict=False)
        files = aot_compile(ep.module(check_guards=False), inputs, options=dict(_AOTI_OPTIONS))
    assert isinstance(files, list), "aot_inductor.package=True returns the list of generated files"
    return files


def _plan_for(cached: CachedModule, args: tuple, kwargs: dict[str, Any]) -> tuple[CachePlan, tuple, dict, bool]:
    """The plan for this call (the module's own if it has one for the model as it is now), the call as captured,
    and whether the timestep was lifted to a tensor (as the runtime does, so one package serves every step)."""
    # The model check a generation start makes: plans captured before the model changed (parameters replaced,
    # load_state_dict(..., assign=True), a submodule swapped, hooks) are dropped, so a stale one is never packaged.
    cached._check_model()
    lifted = cached._timestep.lift(args, kwargs)
    attempts = [(lifted, True)] if lifted is not None else []
    attempts.append(((args, kwargs), False))
    for i, ((a, k), lift) in enumerate(attempts):
        _, sig = flatten_call(cached.model, a, k)
        existing = cached.plans.get(sig)
        if existing is not None:
            return existing, a, k, lift
        try:
            return plan(cached.model, a, k, branch=cached.cache_config.branch), a, k, lift
        except CaptureError:
            if i == len(attempts) - 1:
                raise
    raise AssertionError("unreachable")


def export(
    cached: CachedModule, path: str | os.PathLike[str], args: tuple, kwargs: Mapping[str, Any] | None = None
) -> Path:
    """Compile ``cached``'s full and shallow graphs ahead of time and write them as one package at ``path``.

    The graphs are compiled with AOTInductor for the signature of ``cached(*args, **kwargs)`` (shapes,
    dtypes, device, constant arguments): C++ kernels for CPU inputs, CUDA kernels for CUDA inputs. The
    package also holds the weights (once), the branch, the schedule (``interval``/``schedule``,
    ``total_steps``) and the input and output structure, so :func:`fxcache.load` runs it without the
    model's code. The package is built from the model as it is now: a plan ``cached`` captured before the
    model changed (replaced parameters, swapped submodules, hooks: what a generation start checks) is
    dropped, as its next generation would drop it, and captured again. Otherwise ``cached`` and its model
    are not modified; the inputs are only traced, not run.
    This takes a while: about 15 s per graph for a tiny U-Net on 2 CPU cores, minutes for SD1.5.

    Args:
        cached: made by :func:`fxcache.transform` (its branch and schedule are what the package runs).
        path: the package file to write; it must end in ``.pt2``. Written whole or not at all.
        args, kwargs: an example call, as you would call ``cached`` (a Python-number timestep is
            exported as ``torch.tensor(t)``, as the runtime passes it).

    Returns:
        The package's path.

    Raises:
        ValueError: ``path`` does not end in ``.pt2``, the schedule is a Python function, or an input is
            neither a tensor nor a constant.
        fxcache.CaptureError, ValueError: as :func:`fxcache.plan` (the model is not one graph, the branch
            is out of range).

    Example:
        >>> import torch, fxcache
        >>> from tests.models import PlainUNet                     # doctest: +SKIP
        >>> unet, x, t = PlainUNet().eval(), torch.randn(2, 3, 16, 16), torch.full((2,), 999.0)  # doctest: +SKIP
        >>> cached = fxcache.transform(unet, branch=0, interval=3)  # doctest: +SKIP
        >>> fxcache.export(cached, "unet.pt2", (x, t))             # doctest: +SKIP
        PosixPath('unet.pt2')
    """
    if not isinstance(cached, CachedModule):
        raise TypeError(
            f"fxcache.export takes the module fxcache.transform made, got {type(cached).__name__}: "
            "call fxcache.export(fxcache.transform(model, branch=..., interval=...), path, args, kwargs)"
        )
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"fxcache.export writes a .pt2 package: give a path ending in .pt2, got {str(path)!r}")
    config = cached.cache_config
    schedule = _schedule_json(config.steps_schedule)
    kwargs = dict(kwargs or {})
    with torch.no_grad():  # a package runs inference: its graphs are what eager runs without gradients
        cache_plan, call_args, call_kwargs, lifted = _plan_for(cached, tuple(args), kwargs)

    # Compiled for contiguous inputs whatever the example's layout: the layout a loaded package copies others into.
    leaves = [
        x.clone(memory_format=torch.contiguous_format) if isinstance(x, torch.Tensor) else x
        for x in cache_plan.flatten(call_args, call_kwargs)
    ]
    names = _leaf_names(call_args, call_kwargs)
    leaf_json = [_leaf_json(x, n) for x, n in zip(leaves, names, strict=True)]
    tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    spec = cache_plan.cache_spec
    deep = torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)  # only its metadata matters here
    full_files = _aot_files(_TensorLeaves(cache_plan.full, leaves), tensors)  # the plan's own explicit-feature graphs
    shallow_files = _aot_files(_TensorLeaves(cache_plan.shallow, leaves), (*tensors, deep))

    out_spec = cache_plan.out_spec
    rebuildable = _builtin_spec(out_spec)
    device = spec.device
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch": torch.__version__,
        "fxcache": _fxcache_version(),
        "device": {"type": device.type, "index": device.index},
        "model": type(cached.model).__name__,
        "branch": cache_plan.branch,
        "num_branches": cache_plan.num_branches,
        "skip_from": cache_plan.skip_from,
        "merge_into": cache_plan.merge_into,
        "flops_fraction": cache_plan.flops_fraction,
        "schedule": schedule,
        "total_steps": config.total_steps,
        "lift_timestep": lifted,
        "timestep_arg": [cached._timestep.name, cached._timestep.index],  # where the model takes its timestep
        "training": cache_plan.signature.training,
        "in_spec": pytree.treespec_dumps(cache_plan.signature.spec),
        "inputs": [{"name": n, **x} for n, x in zip(names, leaf_json, strict=True)],
        "out_spec": pytree.treespec_dumps(out_spec) if rebuildable else None,
        "out_type": "tree" if rebuildable else "tuple",
        "out_original": str(out_spec.type) if not out_spec.is_leaf() else "tensor",
        "cache": {
            "shape": list(spec.shape),
            "dtype": str(spec.dtype).removeprefix("torch."),
            "stride": list(deep.stride()),
        },
    }

    from torch.export.pt2_archive._package import package_pt2

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target under the same name (the archive's folder is named after the file), then
    # moved into place: a package is written whole or not at all.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        staged = os.path.join(tmp, path.name)
        package_pt2(
            staged, aoti_files={"full": full_files, "shallow": shallow_files}, extra_files={_META: json.dumps(meta)}
        )
        os.replace(staged, path)
    return path


def _fxcache_version() -> str:
    return __version__


# -- load -------------------------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The package's metadata (``extra/fxcache.json``), read without loading any compiled code.

    Keys: ``format``, ``format_version``, ``torch``, ``fxcache``, ``device`` (``type``, ``index``),
    ``model`` (the class name), ``branch``, ``num_branches``, ``skip_from``, ``merge_into``,
    ``flops_fraction``, ``schedule``, ``total_steps``, ``inputs`` (one entry per input leaf: ``name``,
    ``kind`` and a tensor's ``shape``, ``dtype``, ``device``, ``stride`` (what its kernels were compiled for)
    or a constant's ``value``), ``out_type`` (``"tree"``: the model's own structure; ``"tuple"``: a tuple of
    tensors), ``out_original`` and ``cache`` (``shape``, ``dtype``, ``stride``). A format 1 package (fxcache
    before strides were recorded) reads with contiguous strides, the layout of every documented export call.

    Raises:
        PackageError: the file is missing, not a zip (truncated or corrupted), fails its checksums, or is
            not an fxcache package.
    """
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"no fxcache package at {str(path)!r}: fxcache.export(cached, path, args) writes one")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member: a flipped byte fails its CRC
            if bad is not None:
                raise PackageError(f"{str(path)!r} is corrupted: {bad} fails its checksum. Export the package again.")
            names = [n for n in archive.namelist() if n.endswith("/extra/" + _META)]
            if not names:
                raise PackageError(
                    f"{str(path)!r} is a PT2 archive but not an fxcache package (it has no extra/{_META}); "
                    "fxcache.export(cached, path, args) writes one"
                )
            meta = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise PackageError(
            f"{str(path)!r} is not a readable fxcache package ({type(exc).__name__}: {exc}); it may be truncated "
            "or corrupted. Export it again with fxcache.export."
        ) from exc
    if meta.get("format") != FORMAT or meta.get("format_version") not in _READS:
        raise PackageError(
            f"{str(path)!r} has package format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this fxcache reads {FORMAT!r} versions {', '.join(map(str, _READS))}. Export it again with this fxcache."
        )
    for leaf in [*meta["inputs"], meta["cache"]]:
        if leaf.get("kind", "tensor") == "tensor":
            leaf.setdefault("stride", _contiguous_strides(leaf["shape"]))
    return meta


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _check_compatible(meta: Mapping[str, Any], path: Path, device: torch.device | str | None) -> torch.device:
    built = meta["torch"]
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise PackageError(
            f"{str(path)!r} was built with torch {built}; this is torch {torch.__version__}. AOTInductor "
            "packages run on the torch that built them: export it again with this torch (or install torch "
            f"{built.split('+')[0]})."
        )
    kind = meta["device"]["type"]
    index = meta["device"]["index"]
    if device is not None:
        want = torch.device(device)
        if want.type != kind:
            raise PackageError(
                f"{str(path)!r} holds kernels for {kind}, not {want.type}: export it again with example inputs "
                f"on {want.type} (the same fxcache.export call builds {want.type} kernels)."
            )
        index = want.index if want.index is not None else index
    if kind == "cuda" and not torch.cuda.is_available():
        raise PackageError(
            f"{str(path)!r} holds CUDA kernels, but this machine has no CUDA device (torch {torch.__version__}): "
            "load it on a CUDA machine, or export it again with example inputs on the CPU."
        )
    if kind not in ("cpu", "cuda"):
        raise PackageError(f"{str(path)!r} was built for device {kind!r}, which fxcache.load does not support")
    return torch.device(kind, index) if index is not None else torch.device(kind)


class _CompiledLayout:
    """A runner whose tensors are first put in the layout its kernels were compiled for.

    AOTInductor's kernels read each input at the compiled strides from its data pointer, unchecked: a
    channels_last or sliced tensor would be read in the wrong order, a stride-0 one (``t.expand(2)``) past
    its storage. A tensor with other strides, or a start less aligned than the example's, is copied into a
    new tensor of the compiled strides (exact: the same values); one already laid out so is passed as it is.
    """

    def __init__(self, run: Any, strides: list[tuple[int, ...]]) -> None:
        self.run, self.strides = run, strides

    def __call__(self, tensors: list[torch.Tensor]) -> list[Any]:
        return self.run([_laid_out(t, s) for t, s in zip(tensors, self.strides, strict=True)])


def _laid_out(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    if t.stride() == stride and t.data_ptr() % _ALIGN == 0:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


class _PackagedModel(torch.nn.Module):
    """Stands in for the model, whose code is not in the package: it knows what the package says about it."""

    def __init__(self, meta: Mapping[str, Any], device: torch.device) -> None:
        super().__init__()
        self.name, self.device, self.training = meta["model"], device, bool(meta["training"])
        tensors = [x for x in meta["inputs"] if x["kind"] == "tensor"]
        self.dtype = getattr(torch, tensors[0]["dtype"]) if tensors else torch.get_default_dtype()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"the code of {self.name} is not in the package: call the PackagedModule instead")

    def extra_repr(self) -> str:
        return f"{self.name} (packaged), device={self.device}"


class _PackagePlan:
    """What the runtime asks of a plan for a packaged program: rebuild the output."""

    def __init__(self, out_spec: pytree.TreeSpec | None) -> None:
        self.out_spec = out_spec

    def unflatten(self, flat_out: Any) -> Any:
        if self.out_spec is None:
            return tuple(flat_out)
        return pytree.tree_unflatten(list(flat_out), self.out_spec)


class PackagedModule(CachedModule):
    """A package made by :func:`fxcache.export`, loaded: called like the original model, run like
    :func:`fxcache.transform`'s module (same schedule, generation rules, ``reset()``, ``fxcache_state``).

    Its graphs are fixed: one input signature, one branch. ``configure`` may change the schedule
    (``interval``, ``schedule``, ``total_steps``), not the branch or ``compile``. ``metadata`` is the
    package's :func:`read_metadata`.
    """

    def __init__(self, meta: dict[str, Any], graphs: backends.Graphs, device: torch.device) -> None:
        config = CacheConfig(
            branch=meta["branch"], schedule=_schedule_from_json(meta["schedule"]), total_steps=meta["total_steps"]
        )
        super().__init__(_PackagedModel(meta, device), config)
        self.metadata = meta
        self._lift_numbers = bool(meta["lift_timestep"])
        name, index = meta.get("timestep_arg") or ("timestep", 1)
        self._timestep = _TimestepArg(name, index)  # as the original model's forward takes it
        leaves = tuple(_signature_leaf(x) for x in meta["inputs"])
        self._package_signature = Signature(pytree.treespec_loads(meta["in_spec"]), leaves, bool(meta["training"]))
        out_spec = pytree.treespec_loads(meta["out_spec"]) if meta["out_spec"] is not None else None
        self._packaged = _Entry.of(cast(CachePlan, _PackagePlan(out_spec)), graphs)

    def configure(self, **changes: Any) -> CachedModule:  # type: ignore[override]
        fixed = sorted(k for k in ("branch", "compile") if k in changes and changes[k] != getattr(self._config, k))
        if fixed:
            raise ValueError(
                f"a loaded package's graphs are fixed: {', '.join(fixed)} cannot change (this package runs branch "
                f"{self._config.branch}, compiled ahead of time). Export again with fxcache.export for another one."
            )
        changes = {k: v for k, v in changes.items() if k not in ("branch", "compile")}
        return super().configure(**changes)

    def _entry(self, args: tuple, kwargs: dict[str, Any], call: _Call) -> tuple[_Entry, _Call, Any]:
        sig = call.signature
        if sig.spec != self._package_signature.spec or sig.leaves != self._package_signature.leaves:
            raise PackageError(self._mismatch(call.args, call.kwargs, call.leaves, sig))
        return self._packaged, call, (self._package_signature, self._config.branch, False)

    def _check_model(self) -> None:
        """The packaged graphs cannot be rebuilt from a model: there is nothing to watch."""

    def _mismatch(self, args: tuple, kwargs: dict[str, Any], leaves: list[Any], sig: Signature) -> str:
        expected = self.metadata["inputs"]
        how = (
            "A package is compiled for one input signature; export one for this call with "
            "fxcache.export(fxcache.transform(model, ...), path, args, kwargs) using inputs like these."
        )
        if sig.spec != self._package_signature.spec:
            got = ", ".join(_leaf_names(args, kwargs)) or "nothing"
            want = ", ".join(x["name"] for x in expected) or "nothing"
            return f"this package was exported for a call with inputs ({want}); this call passes ({got}). {how}"
        names = _leaf_names(args, kwargs)
        for name, leaf, have, want in zip(names, leaves, sig.leaves, expected, strict=True):
            if have != _signature_leaf(want):
                got = (
                    _describe(_leaf_json(leaf, name)) if isinstance(leaf, (torch.Tensor, *_CONST_TYPES)) else repr(leaf)
                )
                return f"input {name} is {got}; this package was exported for {_describe(want)}. {how}"
        return f"this call's inputs differ from the package's. {how}"

    def extra_repr(self) -> str:
        return f"packaged, {super().extra_repr()}, device={self.model.device}"


def load(path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> PackagedModule:
    """Load a package written by :func:`fxcache.export`: a module called like the original model.

    ``runner(sample, t, encoder_hidden_states=emb)`` runs the packaged full and shallow graphs on the
    exported schedule with the runtime's rules (a new generation at the first call, after ``reset()``, when
    the timestep rises or the inputs change). Neither diffusers nor the model's code is imported. The
    output has the model's structure when it is made of tensors, tuples, lists and dicts; otherwise (a
    diffusers ``UNet2DConditionOutput``, a dataclass) it is the tuple of its tensors, as the model returns
    with ``return_dict=False``. A package holds kernels for one device kind and one input signature.
    Its kernels assume contiguous inputs: a tensor of another layout (channels_last, transposed, sliced,
    ``t.expand(2)``) is copied into a contiguous one first (a copy per such input and call; pass contiguous
    tensors to avoid it). The result is the contiguous call's, exactly.

    Args:
        path: the ``.pt2`` file.
        device: where to run; must be of the kind the package was built for (default: that device).

    Raises:
        PackageError: the file is truncated, corrupted or not an fxcache package; it was built with another
            torch version or for another device kind; CUDA kernels on a machine without CUDA. Nothing is
            loaded then. A call with other inputs than exported raises PackageError too, naming the input.

    Example:
        >>> runner = fxcache.load("unet.pt2")          # doctest: +SKIP
        >>> out = runner(sample, t, encoder_hidden_states=emb)   # doctest: +SKIP
    """
    path = Path(path)
    meta = read_metadata(path)
    where = _check_compatible(meta, path, device)
    from torch.export.pt2_archive._package import load_pt2

    try:
        contents = load_pt2(
            os.fspath(path), load_weights_from_disk=True, device_index=where.index if where.index is not None else -1
        )
        runners = contents.aoti_runners
        missing = sorted({"full", "shallow"} - set(runners))
        if missing:
            raise PackageError(f"{str(path)!r} lacks the {' and '.join(missing)} graph; export it again")
    except PackageError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PackageError(
            f"{str(path)!r} could not be loaded ({type(exc).__name__}: {first}); "
            "it may be corrupted, or built by another torch. Export it again with fxcache.export."
        ) from exc
    tensor_leaves = tuple(i for i, x in enumerate(meta["inputs"]) if x["kind"] == "tensor")
    strides = [tuple(meta["inputs"][i]["stride"]) for i in tensor_leaves]
    full = _CompiledLayout(runners["full"].loader.boxed_run, strides)
    shallow = _CompiledLayout(runners["shallow"].loader.boxed_run, [*strides, tuple(meta["cache"]["stride"])])
    graphs = backends.aot_inductor(full, shallow, tensor_leaves)
    return PackagedModule(meta, graphs, where)
