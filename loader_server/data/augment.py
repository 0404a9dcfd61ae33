"""Per-sample augmentation for worker processes, parsed from repeatable ``--augment`` flags.

Determinism is the point of this module's design. Every sample gets its own generator,
``sample_rng(seed, epoch, sample_id)``, and every op draws all of its randomness from that
generator in a fixed order (the "apply?" coin first, then the op's parameters), never from
global state and never depending on data values. So batch i of epoch e is byte-identical
however many workers there are and whichever worker happens to build it.

Specs are validated once, up front, by ``build_pipeline`` so that a typo in a flag is reported
naming the flag instead of surfacing later inside a worker. Output dtypes depend only on input
dtypes (never on the coin) because batches are assembled into fixed-dtype buffers.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import numpy as np

__all__ = [
    "AugmentError",
    "OpSpec",
    "Pipeline",
    "build_pipeline",
    "describe_ops",
    "parse_spec",
    "sample_rng",
]

Value = bool | int | float | str
Pair = tuple[np.ndarray, "np.ndarray | None"]

SCIPY_MODES = ("constant", "nearest", "reflect", "mirror", "wrap",
               "grid-constant", "grid-mirror", "grid-wrap")
# Shifts are whole pixels, so they are done by padding and slicing; these are numpy's names
# for the scipy boundary modes that make sense for an integer shift.
SHIFT_PAD_MODES = {"constant": "constant", "nearest": "edge", "reflect": "symmetric",
                   "mirror": "reflect", "wrap": "wrap"}
CUSTOM_SYNTAX = "module.path:callable[:k=v,...]"


class AugmentError(ValueError):
    """A bad ``--augment`` spec or a failing op; the message names the spec and what to do."""


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The one generator a sample's augmentation may draw from.

    Seeding from (seed, epoch, sample_id) rather than from a worker's stream is what makes a
    sample's augmentation independent of which worker handles it and in what order.
    """
    entropy = [int(seed), int(epoch), int(sample_id)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class OpSpec:
    """One parsed ``--augment`` string.

    ``params`` is a read-only mapping so a spec cannot drift from its ``text``; hashing uses
    name and text only (the mapping itself is unhashable), and pickling rebuilds the mapping
    so specs can travel to spawned worker processes.
    """

    name: str
    params: Mapping[str, Value] = field(hash=False)
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, Value], str]]:
        return (OpSpec, (self.name, dict(self.params), self.text))

    @property
    def is_custom(self) -> bool:
        return self.name not in OPS


def _spec_error(text: str, message: str) -> AugmentError:
    return AugmentError(f"--augment '{text}': {message}")


def parse_spec(text: str) -> OpSpec:
    """Split ``NAME[:k=v,...]`` or ``module.path:callable[:k=v,...]`` into an OpSpec.

    Only the grammar is checked here (no imports, no parameter validation) so parsing stays
    cheap and side-effect free; ``build_pipeline`` does the rest. A builtin name wins over a
    module of the same name, which keeps ``rotate:degrees=15`` unambiguous.
    """
    if not isinstance(text, str) or not text.strip():
        raise AugmentError(f"--augment {text!r}: empty spec; write OP or OP:k=v,... "
                           f"(e.g. rotate:degrees=15)")
    head, colon, rest = text.partition(":")
    head = head.strip()
    if head in OPS:
        params = _parse_params(text, rest) if colon else {}
        return OpSpec(head, params, text)
    func, colon2, param_text = rest.partition(":")
    func = func.strip()
    if not colon or "=" in func:
        raise _spec_error(text, _unknown_op_message(head))
    if not all(part.isidentifier() for part in head.split(".")) or not func.isidentifier():
        raise _spec_error(text, f"custom ops are written {CUSTOM_SYNTAX} with an importable "
                                f"dotted module name (not a file path) and a callable's name")
    params = _parse_params(text, param_text) if colon2 else {}
    return OpSpec(f"{head}:{func}", params, text)


def _unknown_op_message(head: str) -> str:
    close = difflib.get_close_matches(head, OPS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"unknown op '{head}'; {hint}builtin ops: {', '.join(OPS)}; "
            f"custom ops are written {CUSTOM_SYNTAX}")


def _parse_params(text: str, param_text: str) -> dict[str, Value]:
    params: dict[str, Value] = {}
    for item in param_text.split(","):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq:
            raise _spec_error(text, f"expected k=v in the parameter list, got '{item.strip()}'")
        if not key or not raw:
            raise _spec_error(text, f"empty key or value in '{item.strip()}'; write k=v,k=v")
        if not key.isidentifier():
            raise _spec_error(text, f"parameter name '{key}' must be a Python identifier")
        if key in params:
            raise _spec_error(text, f"parameter '{key}' is given twice")
        params[key] = _parse_value(raw)
    return params


def _parse_value(raw: str) -> Value:
    """int if it is one, else float, else true/false, else the string itself."""
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    return raw


def _coin(rng: np.random.Generator, p: float) -> bool:
    """Always one draw, even for p=1, so later draws line up whatever p is."""
    return bool(rng.random() < p)


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be between 0 and 1, got {p}")


def _check_choice(key: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low:g} and {high:g}, got {value}")


def _check_image_shape(op: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise AugmentError(f"{op} needs samples of at least 2 dims (H, W[, C]), got shape "
                           f"{shape}; use --x-shape to reshape rows")


def _check_targets(x: np.ndarray, y: np.ndarray | None) -> None:
    if y is not None and (np.ndim(y) < 2 or np.shape(y)[:2] != x.shape[:2]):
        raise AugmentError(f"spatial targets must share the sample's (H, W) = {x.shape[:2]}, "
                           f"got target shape {np.shape(y)}")


def _resample(a: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run a scipy interpolation keeping a's dtype.

    Integers and bools go through float64 and are rounded and clipped back, because spline
    ringing would otherwise wrap around (e.g. -1 becoming 255 in uint8); float16, which
    scipy does not support, goes through float32.
    """
    if a.dtype in (np.float32, np.float64):
        return transform(a)
    if a.dtype.kind == "f":
        return transform(a.astype(np.float32)).astype(a.dtype)
    if a.dtype.kind in "iub":
        info = (0, 1) if a.dtype.kind == "b" else (np.iinfo(a.dtype).min, np.iinfo(a.dtype).max)
        out = np.rint(transform(a.astype(np.float64)))
        return np.clip(out, *info).astype(a.dtype)
    return transform(a)


def _value_dtype(x: np.ndarray) -> np.ndarray:
    """The dtype rule for value ops: float64 stays, anything else becomes float32."""
    return x if x.dtype == np.float64 else x.astype(np.float32, copy=False)


class _Op:
    """What the pipeline needs from a builtin: a name, help text, and how shapes change.

    ``geometric`` ops move pixels, so the pipeline hands them spatial targets to move the
    same way; value ops only ever see x.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    geometric: ClassVar[bool] = False
    # Heavy modules the op calls into: imported when a pipeline using it is built, so a
    # process that never uses such an op never pays for them, and one that does pays at its
    # start rather than in its first batch.
    imports: ClassVar[tuple[str, ...]] = ()

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.geometric:
            _check_image_shape(self.name, shape)
        return shape

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        raise NotImplementedError


class _GeometricOp(_Op):
    """Coin, then parameters, then the same transform on x and (nearest-neighbour) on y."""

    geometric = True
    p: float

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        _check_image_shape(self.name, x.shape)
        _check_targets(x, y)
        if not _coin(rng, self.p):
            return x, y
        draw = self._draw(rng, x.shape)
        y_out = None if y is None else self._transform(y, draw, True)
        return self._transform(x, draw, False), y_out

    def _draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _transform(self, a: np.ndarray, draw: Any, targets: bool) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Rotate(_GeometricOp):
    """Rotation about the centre keeping the shape, so batches stay rectangular."""

    name = "rotate"
    summary = "rotate by an angle uniform in [-degrees, degrees]"
    imports = ("scipy.ndimage",)
    degrees: float = 15.0
    p: float = 0.5
    order: int = 1
    mode: str = "constant"

    def __post_init__(self) -> None:
        _check_range("degrees", self.degrees, 0, 180)
        _check_probability(self.p)
        _check_choice("order", self.order, range(6))
        _check_choice("mode", self.mode, SCIPY_MODES)

    def _draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> float:
        return float(rng.uniform(-self.degrees, self.degrees))

    def _transform(self, a: np.ndarray, angle: float, targets: bool) -> np.ndarray:
        from scipy import ndimage  # see _Op.imports

        order = 0 if targets else self.order
        return _resample(a, lambda b: ndimage.rotate(b, angle, axes=(1, 0), reshape=False,
                                                     order=order, mode=self.mode))


@dataclass(frozen=True)
class Flip(_GeometricOp):
    """Mirror along H (axis=0) or W (axis=1); exact for any dtype, so masks need no care."""

    name = "flip"
    summary = "mirror along axis 0 (vertical) or 1 (horizontal)"
    axis: int = 1
    p: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("axis", self.axis, (0, 1))
        _check_probability(self.p)

    def _draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
        return None

    def _transform(self, a: np.ndarray, draw: None, targets: bool) -> np.ndarray:
        return np.flip(a, axis=self.axis).copy()


@dataclass(frozen=True)
class Shift(_GeometricOp):
    """Whole-pixel translation: exact for every dtype and for masks, no interpolation."""

    name = "shift"
    summary = "translate by whole pixels, uniform in [-pixels, pixels] on H and W"
    pixels: int = 4
    p: float = 1.0
    mode: str = "constant"

    def __post_init__(self) -> None:
        if self.pixels < 0:
            raise ValueError(f"pixels must be >= 0, got {self.pixels}")
        _check_probability(self.p)
        _check_choice("mode", self.mode, tuple(SHIFT_PAD_MODES))

    def _draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, int]:
        dy, dx = rng.integers(-self.pixels, self.pixels, size=2, endpoint=True)
        return int(dy), int(dx)

    def _transform(self, a: np.ndarray, draw: tuple[int, int], targets: bool) -> np.ndarray:
        dy, dx = draw
        pad = self.pixels
        padded = np.pad(a, [(pad, pad), (pad, pad)] + [(0, 0)] * (a.ndim - 2),
                        mode=SHIFT_PAD_MODES[self.mode])
        h, w = a.shape[:2]
        return padded[pad - dy:pad - dy + h, pad - dx:pad - dx + w].copy()


@dataclass(frozen=True)
class Zoom(_GeometricOp):
    """Zoom about the centre with the output shape unchanged (crops in, pads out)."""

    name = "zoom"
    summary = "scale H and W about the centre by a factor uniform in [1-range, 1+range]"
    imports = ("scipy.ndimage",)
    range: float = 0.1
    p: float = 1.0
    order: int = 1
    mode: str = "constant"

    def __post_init__(self) -> None:
        if not 0.0 <= self.range < 1.0:
            raise ValueError(f"range must be >= 0 and < 1, got {self.range}")
        _check_probability(self.p)
        _check_choice("order", self.order, range(6))
        _check_choice("mode", self.mode, SCIPY_MODES)

    def _draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> float:
        return float(rng.uniform(1.0 - self.range, 1.0 + self.range))

    def _transform(self, a: np.ndarray, factor: float, targets: bool) -> np.ndarray:
        from scipy import ndimage  # see _Op.imports

        scale = np.ones(a.ndim)
        scale[:2] = 1.0 / factor
        centre = (np.asarray(a.shape[:2], dtype=np.float64) - 1.0) / 2.0
        offset = np.zeros(a.ndim)
        offset[:2] = centre - centre / factor
        order = 0 if targets else self.order
        return _resample(a, lambda b: ndimage.affine_transform(b, scale, offset=offset,
                                                               order=order, mode=self.mode))


@dataclass(frozen=True)
class Crop(_Op):
    """Random window of a fixed size; always applied, since batch shapes must not vary."""

    name = "crop"
    summary = "random height x width window (always applied; changes the output shape)"
    geometric = True
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}, {self.width}")

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        _check_image_shape(self.name, shape)
        if self.height > shape[0] or self.width > shape[1]:
            raise AugmentError(f"crop of {self.height}x{self.width} is bigger than the sample's "
                               f"(H, W) = {shape[:2]}; use height <= {shape[0]}, "
                               f"width <= {shape[1]}")
        return (self.height, self.width, *shape[2:])

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        self.output_shape(x.shape)
        _check_targets(x, y)
        top = int(rng.integers(0, x.shape[0] - self.height, endpoint=True))
        left = int(rng.integers(0, x.shape[1] - self.width, endpoint=True))
        window = (slice(top, top + self.height), slice(left, left + self.width))
        return x[window].copy(), None if y is None else y[window].copy()


class _ValueOp(_Op):
    """Coin, then parameters; casts to the value dtype even when the coin says skip."""

    p: float

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        out = _value_dtype(x)
        if _coin(rng, self.p):
            out = self._apply(out, rng).astype(out.dtype, copy=False)
        return out, y

    def _apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Noise(_ValueOp):
    """Additive Gaussian noise, drawn in the output dtype to avoid float64 temporaries."""

    name = "noise"
    summary = "add Gaussian noise with standard deviation std"
    std: float = 0.05
    p: float = 1.0

    def __post_init__(self) -> None:
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")
        _check_probability(self.p)

    def _apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x + rng.standard_normal(x.shape, dtype=x.dtype) * self.std


@dataclass(frozen=True)
class Brightness(_ValueOp):
    """One offset for the whole sample, like an exposure change (per-pixel is noise's job)."""

    name = "brightness"
    summary = "add one offset uniform in [-delta, delta]"
    delta: float = 0.1
    p: float = 1.0

    def __post_init__(self) -> None:
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        _check_probability(self.p)

    def _apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x + float(rng.uniform(-self.delta, self.delta))


@dataclass(frozen=True)
class Contrast(_ValueOp):
    """Scale around the sample mean, so the mean brightness is kept."""

    name = "contrast"
    summary = "scale around the sample mean by a factor uniform in [1-range, 1+range]"
    range: float = 0.2
    p: float = 1.0

    def __post_init__(self) -> None:
        _check_range("range", self.range, 0, 1)
        _check_probability(self.p)

    def _apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = float(rng.uniform(1.0 - self.range, 1.0 + self.range))
        mean = float(x.mean(dtype=np.float64))
        return (x - mean) * factor + mean


@dataclass(frozen=True)
class Normalize(_Op):
    """Fixed (x - mean) / std, or per-sample standardisation when neither is given.

    Mean and std come as a pair: fixing one and estimating the other per sample is rarely
    intended, so giving only one is rejected rather than guessed.
    """

    name = "normalize"
    summary = "(x - mean) / std; per-sample standardisation if both are omitted"
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither for per-sample standardisation")
        if self.std is not None and self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        out = _value_dtype(x)
        if self.mean is None or self.std is None:
            mean = float(out.mean(dtype=np.float64))
            std = max(float(out.std(dtype=np.float64)), 1e-7)
        else:
            mean, std = self.mean, self.std
        return ((out - mean) / std).astype(out.dtype, copy=False), y


OPS: dict[str, type[_Op]] = {cls.name: cls for cls in
                             (Rotate, Flip, Shift, Zoom, Crop, Noise, Brightness, Contrast,
                              Normalize)}


@dataclass(frozen=True)
class _CustomOp:
    """A user callable ``fn(x, y, rng, **params) -> (x, y)``, imported by dotted name."""

    fn: Callable[..., Any]
    params: tuple[tuple[str, Value], ...]

    def __call__(self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator) -> Pair:
        result = self.fn(x, y, rng, **dict(self.params))
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(f"a custom op must return a tuple (x, y), got {type(result).__name__}")
        return result


def _param_types(cls: type[_Op]) -> dict[str, tuple[type, ...]]:
    hints = get_type_hints(cls)
    return {f.name: getattr(hints[f.name], "__args__", (hints[f.name],)) for f in fields(cls)}


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a word"}


def _coerce(key: str, value: Value, allowed: tuple[type, ...]) -> Value:
    """Check a parsed value against a builtin's field type; ints are accepted for floats."""
    wanted = " or ".join(_TYPE_WORDS[t] for t in allowed if t is not type(None))
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        if int not in allowed and float in allowed:
            value = float(value)
    elif isinstance(value, float):
        ok = float in allowed
        if ok and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    else:
        ok = str in allowed
    if not ok:
        raise ValueError(f"{key} must be {wanted}, got {value!r}")
    return value


def _build_builtin(spec: OpSpec) -> _Op:
    cls = OPS[spec.name]
    types_ = _param_types(cls)
    unknown = [key for key in spec.params if key not in types_]
    if unknown:
        raise _spec_error(spec.text, f"unknown parameter '{unknown[0]}' for {spec.name}; "
                                     f"known: {', '.join(types_)}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in spec.params]
    if missing:
        raise _spec_error(spec.text, f"{spec.name} needs {', '.join(missing)} "
                                     f"(e.g. {spec.name}:{','.join(f'{m}=32' for m in missing)})")
    try:
        kwargs = {key: _coerce(key, value, types_[key]) for key, value in spec.params.items()}
        return cls(**kwargs)
    except ValueError as exc:
        raise _spec_error(spec.text, str(exc)) from exc


def _build_custom(spec: OpSpec) -> _CustomOp:
    module_name, func_name = spec.name.split(":")
    where = "custom op modules must be importable on the server's Python path " \
            "(install the package or add its folder to PYTHONPATH)"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # importing user code runs it, and it may raise anything; say which spec
        raise _spec_error(spec.text, f"cannot import module '{module_name}' ({exc}); {where}") \
            from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise _spec_error(spec.text, f"module '{module_name}' has no attribute '{func_name}'; "
                                     f"{where}")
    if not callable(fn):
        raise _spec_error(spec.text, f"'{spec.name}' is not callable; it must be "
                                     f"fn(x, y, rng, **params) -> (x, y)")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, None, **spec.params)
        except TypeError as exc:
            raise _spec_error(spec.text, f"{spec.name} cannot be called as "
                                         f"fn(x, y, rng, **params): {exc}") from exc
    return _CustomOp(fn, tuple(spec.params.items()))


def _detach(out: Any, original: Any) -> Any:
    """A C-contiguous array not aliasing the input, which may be a read-only memory map.

    Copies only when needed: most ops already return fresh arrays. Non-arrays (scalar
    labels) are returned as they are.
    """
    if not isinstance(out, np.ndarray):
        return out
    if not out.flags.c_contiguous or (isinstance(original, np.ndarray)
                                      and np.may_share_memory(out, original)):
        return out.copy(order="C")
    return out


@dataclass(frozen=True)
class Pipeline:
    """The ops of one dataset's ``--augment`` flags, applied in order to one sample.

    Built once (``build_pipeline``) and picklable, so it can be built in the parent for
    validation and shipped to, or rebuilt in, each worker.
    """

    specs: tuple[OpSpec, ...]
    ops: tuple[Callable[..., Pair], ...] = field(repr=False)
    spatial_targets: bool = False

    def __len__(self) -> int:
        return len(self.ops)

    def __call__(self, x: np.ndarray, y: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Augment one sample; outputs are C-contiguous and never alias the inputs.

        Builtin ops see y only when targets are spatial; otherwise labels pass through
        untouched. Custom ops always receive y as given.
        """
        if not self.ops:
            return x, y
        out_x, out_y = np.asarray(x), y
        for spec, op in zip(self.specs, self.ops):
            try:
                if isinstance(op, _CustomOp) or self.spatial_targets:
                    out_x, out_y = op(out_x, out_y, rng)
                else:
                    out_x = op(out_x, None, rng)[0]
            except Exception as exc:  # an op (a custom one above all) may raise anything; name the op
                raise AugmentError(f"augment op '{spec.text}' failed: {exc}") from exc
        return _detach(np.asarray(out_x), x), _detach(out_y, y)

    def output_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The augmented shape of a sample of ``x_shape``, checked before any data is read.

        Lets the server reject, say, a crop larger than the samples or rotate on 1-D rows
        at startup, and size batch buffers when crop changes the shape. Returns None when a
        custom op makes the shape unknowable (checks stop there).
        """
        shape = tuple(x_shape)
        for spec, op in zip(self.specs, self.ops):
            if isinstance(op, _CustomOp):
                return None
            try:
                shape = op.output_shape(shape)
            except AugmentError as exc:
                raise _spec_error(spec.text, str(exc)) from exc
        return shape


def build_pipeline(specs: Sequence[str], *, spatial_targets: bool) -> Pipeline:
    """Parse and validate every spec (ops, params, custom imports) before any data flows.

    ``spatial_targets`` says y has the sample's (H, W) (paired image/mask layout), so
    geometric ops must move it with x.
    """
    if isinstance(specs, str):
        raise AugmentError(f"--augment: expected a list of specs, got the single string "
                           f"{specs!r}; pass [{specs!r}]")
    parsed = tuple(parse_spec(text) for text in specs)
    ops = tuple(_build_custom(spec) if spec.is_custom else _build_builtin(spec)
                for spec in parsed)
    for module in dict.fromkeys(m for op in ops for m in getattr(op, "imports", ())):
        importlib.import_module(module)
    return Pipeline(parsed, ops, spatial_targets)


def describe_ops() -> str:
    """Help text for ``npyloader serve --help``, generated from the op classes themselves."""
    lines = ["augment ops (--augment OP or OP:k=v,...; repeatable, applied in order):"]
    for name, cls in OPS.items():
        params = " ".join(f"{f.name}={_default_text(f.default)}" for f in fields(cls))
        lines.append(f"  {name:<11}{params}")
        lines.append(f"  {'':<11}{cls.summary}")
    lines.append(f"custom ops: --augment {CUSTOM_SYNTAX}, called as")
    lines.append("  fn(x, y, rng, **params) -> (x, y); draw randomness only from rng")
    return "\n".join(lines)


def _default_text(default: object) -> str:
    if default is MISSING:
        return "<required>"
    return "<optional>" if default is None else str(default)
