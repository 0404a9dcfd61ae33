"""Tests for loader_server.data.augment: determinism, each op's effect, targets, specs and errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from loader_server.data.augment import (
    AugmentError,
    OpSpec,
    build_pipeline,
    describe_ops,
    parse_spec,
    sample_rng,
)

GEOMETRIC = ["rotate", "flip", "shift", "zoom", "crop:height=12,width=10"]
VALUE = ["noise", "brightness", "contrast", "normalize"]
ALL_RANDOM = ["rotate:p=1", "flip:p=1", "shift", "zoom:range=0.2", "crop:height=12,width=10",
              "noise", "brightness", "contrast"]


def image(shape: tuple[int, ...] = (16, 16, 3), dtype: type = np.float32) -> np.ndarray:
    values = np.random.default_rng(123).random(shape)
    if np.dtype(dtype).kind in "iu":
        values = values * 255
    return values.astype(dtype)


def mask(shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    """Integer classes 0..3 in blocks, so nearest-neighbour keeps exactly these values."""
    classes = np.zeros(shape, dtype=np.int64)
    classes[3:9, 2:7] = 1
    classes[10:14, 8:15] = 2
    classes[2:6, 10:13] = 3
    return classes


def run(spec: str, x: np.ndarray, y=None, *, spatial: bool = False, rng=None):
    rng = sample_rng(0, 0, 0) if rng is None else rng
    return build_pipeline([spec], spatial_targets=spatial)(x, y, rng)


# determinism ------------------------------------------------------------------------------

def test_sample_rng_is_seeded_by_seed_epoch_and_sample_id():
    expected = np.random.default_rng(np.random.SeedSequence([7, 2, 41])).random(4)
    assert np.array_equal(sample_rng(7, 2, np.int64(41)).random(4), expected)


def test_same_seed_epoch_sample_gives_identical_bytes_and_other_samples_differ():
    pipeline = build_pipeline(ALL_RANDOM, spatial_targets=True)
    x, y = image(), mask()
    first = pipeline(x, y, sample_rng(5, 1, 9))
    again = pipeline(x, y, sample_rng(5, 1, 9))
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1].tobytes() == again[1].tobytes()
    assert pipeline(x, y, sample_rng(5, 1, 10))[0].tobytes() != first[0].tobytes()
    assert pipeline(x, y, sample_rng(5, 2, 9))[0].tobytes() != first[0].tobytes()


@pytest.fixture
def global_random_state():
    """Tests that reseed numpy's global generator put it back for everyone else."""
    saved = np.random.get_state()
    yield
    np.random.set_state(saved)


def test_ops_ignore_and_leave_alone_numpy_global_random_state(global_random_state):
    pipeline = build_pipeline(ALL_RANDOM, spatial_targets=False)
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    first = pipeline(image(), None, sample_rng(0, 0, 3))[0]
    assert np.array_equal(np.random.get_state()[1], state)
    np.random.seed(2)
    assert np.array_equal(pipeline(image(), None, sample_rng(0, 0, 3))[0], first)


def test_pipeline_survives_pickling_for_worker_processes():
    pipeline = build_pipeline(ALL_RANDOM + ["normalize"], spatial_targets=True)
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone == pipeline
    expected = pipeline(image(), mask(), sample_rng(1, 1, 1))
    actual = clone(image(), mask(), sample_rng(1, 1, 1))
    assert all(np.array_equal(a, b) for a, b in zip(expected, actual))


def test_scipy_is_imported_by_building_a_pipeline_that_needs_it_and_not_otherwise():
    """A worker without rotate or zoom never pays for scipy (a third of its start-up imports);
    one with them pays when its pipeline is built, not in its first batch."""
    script = textwrap.dedent("""
        import sys
        import loader_server.worker.loop, loader_server.serve.server
        from loader_server.data.augment import build_pipeline
        build_pipeline(["flip", "shift", "crop:height=2,width=2", "noise", "normalize"], spatial_targets=False)
        print("scipy" in sys.modules)
        build_pipeline(["zoom"], spatial_targets=False)
        print("scipy.ndimage" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


# each op's effect -------------------------------------------------------------------------

def test_rotate_draws_coin_then_angle_and_matches_scipy_rotate():
    x = image((16, 16))
    out, _ = run("rotate:degrees=40,p=1", x, rng=sample_rng(0, 0, 1))
    draws = sample_rng(0, 0, 1)
    draws.random()
    angle = draws.uniform(-40, 40)
    expected = ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1, mode="constant")
    assert np.array_equal(out, expected)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_rotate_with_p_zero_returns_an_equal_copy():
    x = image()
    out, _ = run("rotate:p=0", x)
    assert np.array_equal(out, x) and not np.shares_memory(out, x)


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_mirrors_the_chosen_axis(axis):
    x = image()
    out, _ = run(f"flip:axis={axis},p=1", x)
    assert np.array_equal(out, np.flip(x, axis=axis))


def test_shift_is_a_whole_pixel_translation_padded_with_zeros():
    x = image((16, 16), np.uint8)
    out, _ = run("shift:pixels=5", x, rng=sample_rng(0, 0, 2))
    draws = sample_rng(0, 0, 2)
    draws.random()
    dy, dx = draws.integers(-5, 5, size=2, endpoint=True)
    assert (dy, dx) != (0, 0)
    assert np.array_equal(out, ndimage.shift(x, (dy, dx), order=0, mode="constant"))


def test_shift_wrap_mode_equals_numpy_roll():
    x = image((16, 16, 2))
    out, _ = run("shift:pixels=3,mode=wrap", x, rng=sample_rng(0, 0, 2))
    draws = sample_rng(0, 0, 2)
    draws.random()
    dy, dx = draws.integers(-3, 3, size=2, endpoint=True)
    assert np.array_equal(out, np.roll(x, (dy, dx), axis=(0, 1)))


def test_zoom_scales_area_about_the_centre_and_keeps_shape():
    square = np.zeros((40, 40), dtype=np.float32)
    square[12:28, 12:28] = 1.0
    for sample_id in range(4):
        out, _ = run("zoom:range=0.3,order=0", square, rng=sample_rng(0, 0, sample_id))
        draws = sample_rng(0, 0, sample_id)
        draws.random()
        factor = draws.uniform(0.7, 1.3)
        assert out.shape == square.shape
        assert out.sum() == pytest.approx(square.sum() * factor**2, rel=0.2)
        rows, cols = np.nonzero(out)
        assert rows.mean() == pytest.approx(19.5, abs=0.6)
        assert cols.mean() == pytest.approx(19.5, abs=0.6)


def test_zoom_with_zero_range_is_identity():
    x = image()
    assert np.allclose(run("zoom:range=0", x)[0], x, atol=1e-5)


def test_crop_takes_a_window_of_the_requested_size():
    x = image((16, 16, 3))
    out, _ = run("crop:height=12,width=10", x, rng=sample_rng(0, 0, 4))
    draws = sample_rng(0, 0, 4)
    top = draws.integers(0, 4, endpoint=True)
    left = draws.integers(0, 6, endpoint=True)
    assert out.shape == (12, 10, 3)
    assert np.array_equal(out, x[top:top + 12, left:left + 10])


def test_noise_adds_gaussian_noise_of_the_given_std():
    x = image((64, 64), np.uint8)
    out, _ = run("noise:std=2.5", x)
    difference = out - x.astype(np.float32)
    assert out.dtype == np.float32
    assert difference.std() == pytest.approx(2.5, rel=0.1)
    assert abs(difference.mean()) < 0.2


def test_brightness_adds_one_offset_within_delta():
    x = image()
    out, _ = run("brightness:delta=0.3", x)
    offsets = out - x
    assert np.allclose(offsets, offsets.flat[0], atol=1e-6)
    assert 0 < abs(offsets.flat[0]) <= 0.3


def test_contrast_scales_around_the_mean_and_keeps_it():
    x = image()
    out, _ = run("contrast:range=0.5", x)
    factor = (out - x.mean()).std() / (x - x.mean()).std()
    assert out.mean() == pytest.approx(x.mean(), abs=1e-5)
    assert 0.5 <= factor <= 1.5 and factor != pytest.approx(1.0)
    assert np.allclose(out - out.mean(), (x - x.mean()) * factor, atol=1e-5)


def test_normalize_standardises_each_sample_when_no_mean_or_std_given():
    out, _ = run("normalize", image((16, 16), np.uint8))
    assert out.mean() == pytest.approx(0.0, abs=1e-5)
    assert out.std() == pytest.approx(1.0, abs=1e-4)


def test_normalize_of_a_constant_sample_is_zero_not_nan():
    out, _ = run("normalize", np.full((4, 4), 7, dtype=np.uint8))
    assert np.array_equal(out, np.zeros((4, 4), dtype=np.float32))


def test_normalize_with_fixed_mean_and_std():
    x = image((4, 4), np.uint8)
    out, _ = run("normalize:mean=127.5,std=64", x)
    assert np.allclose(out, (x.astype(np.float32) - 127.5) / 64)


# dtype rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [f"{op}:p=0.5" for op in ("rotate", "flip", "shift", "zoom")]
                         + ["crop:height=8,width=8"])
def test_geometric_ops_keep_uint8_whether_or_not_the_coin_applies(spec):
    pipeline = build_pipeline([spec], spatial_targets=False)
    x = image((12, 12, 3), np.uint8)
    outputs = [pipeline(x, None, sample_rng(0, 0, i))[0] for i in range(40)]
    assert {out.dtype for out in outputs} == {np.dtype(np.uint8)}
    assert any(not np.array_equal(out, outputs[0]) for out in outputs)


@pytest.mark.parametrize("spec", ["noise:p=0.5", "brightness:p=0.5", "contrast:p=0.5"])
def test_value_ops_give_float32_for_uint8_whether_or_not_the_coin_applies(spec):
    pipeline = build_pipeline([spec], spatial_targets=False)
    x = image((12, 12, 3), np.uint8)
    outputs = [pipeline(x, None, sample_rng(0, 0, i))[0] for i in range(40)]
    skipped = [np.array_equal(out, x) for out in outputs]
    assert {out.dtype for out in outputs} == {np.dtype(np.float32)}
    assert any(skipped) and not all(skipped)


@pytest.mark.parametrize("spec", VALUE)
@pytest.mark.parametrize("dtype, expected", [(np.float64, np.float64), (np.float32, np.float32),
                                             (np.float16, np.float32), (np.int16, np.float32)])
def test_value_ops_keep_float64_and_turn_everything_else_into_float32(spec, dtype, expected):
    assert run(spec, image((8, 8), dtype))[0].dtype == expected


@pytest.mark.parametrize("dtype", [np.float16, np.bool_, np.int32])
@pytest.mark.parametrize("spec", ["rotate:p=1,order=3", "zoom:range=0.3,order=3"])
def test_interpolating_ops_keep_dtypes_scipy_lacks_or_could_overflow(spec, dtype):
    x = image((12, 12), np.float32) > 0.5 if dtype is np.bool_ else image((12, 12), dtype)
    out, _ = run(spec, x.astype(dtype))
    assert out.dtype == dtype


def test_uint8_spline_rotation_rounds_and_clips_instead_of_wrapping_around():
    x = np.zeros((16, 16), dtype=np.uint8)
    x[4:12, 4:12] = 255
    out, _ = run("rotate:p=1,degrees=30,order=3", x, rng=sample_rng(0, 0, 1))
    draws = sample_rng(0, 0, 1)
    draws.random()
    angle = draws.uniform(-30, 30)
    exact = ndimage.rotate(x.astype(np.float64), angle, axes=(1, 0), reshape=False, order=3)
    assert exact.min() < -0.5 and exact.max() > 255.5
    assert np.array_equal(out, np.clip(np.rint(exact), 0, 255).astype(np.uint8))


# targets ----------------------------------------------------------------------------------

def test_flip_applies_exactly_the_same_flip_to_spatial_targets():
    y = mask()
    _, out = run("flip:p=1", image(), y, spatial=True)
    assert np.array_equal(out, np.flip(y, axis=1))


@pytest.mark.parametrize("spec", ["rotate:p=1,degrees=90,order=0", "zoom:range=0.4,order=0",
                                  "shift:pixels=6", "crop:height=10,width=11"])
def test_geometric_ops_move_targets_by_nearest_neighbour_in_step_with_x(spec):
    """With x a float copy of the mask and order=0 for x too, both must come out equal."""
    y = mask()
    pipeline = build_pipeline([spec], spatial_targets=True)
    for sample_id in range(5):
        x_out, y_out = pipeline(y.astype(np.float32), y, sample_rng(3, 0, sample_id))
        assert y_out.dtype == y.dtype
        assert set(np.unique(y_out)) <= set(np.unique(y))
        assert np.array_equal(x_out, y_out.astype(np.float32))


def test_targets_follow_x_even_when_x_interpolates_linearly():
    x, y = image((16, 16)), mask()
    x_out, y_out = run("rotate:p=1,degrees=60", x, y, spatial=True, rng=sample_rng(0, 0, 8))
    draws = sample_rng(0, 0, 8)
    draws.random()
    angle = draws.uniform(-60, 60)
    assert np.array_equal(x_out, ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1))
    assert np.array_equal(y_out, ndimage.rotate(y, angle, axes=(1, 0), reshape=False, order=0))


def test_value_ops_never_touch_spatial_targets():
    y = mask()
    _, out = build_pipeline(VALUE, spatial_targets=True)(image(), y, sample_rng(0, 0, 0))
    assert np.array_equal(out, y) and out.dtype == y.dtype


@pytest.mark.parametrize("label", [np.int64(3), np.array(3), np.array([1, 0, 2]), 4, None])
def test_labels_pass_through_every_op_untouched(label):
    pipeline = build_pipeline(ALL_RANDOM + ["normalize"], spatial_targets=False)
    _, out = pipeline(image(), label, sample_rng(0, 0, 0))
    assert (out is None) if label is None else np.array_equal(out, label)


def test_image_shaped_targets_are_left_alone_without_spatial_targets():
    y = mask()
    _, out = run("flip:p=1", image(), y, spatial=False)
    assert np.array_equal(out, y)


def test_spatial_targets_of_the_wrong_size_are_reported():
    with pytest.raises(AugmentError, match=r"augment op 'flip' failed: spatial targets"):
        run("flip", image(), mask((8, 8)), spatial=True)


# inputs are never modified, outputs never alias them -------------------------------------

def test_read_only_inputs_are_never_modified_and_outputs_are_fresh_contiguous_arrays():
    for specs in [ALL_RANDOM + ["normalize"], ["rotate:p=0"], ["noise:p=0"], ["flip:p=0"]]:
        x, y = image(), mask()
        x.setflags(write=False)
        y.setflags(write=False)
        x_copy, y_copy = x.copy(), y.copy()
        x_out, y_out = build_pipeline(specs, spatial_targets=True)(x, y, sample_rng(0, 0, 0))
        assert np.array_equal(x, x_copy) and np.array_equal(y, y_copy)
        for out, original in [(x_out, x), (y_out, y)]:
            assert out.flags.c_contiguous and not np.shares_memory(out, original)


def test_empty_pipeline_returns_inputs_untouched():
    pipeline = build_pipeline([], spatial_targets=False)
    x, y = image(), np.int64(1)
    assert len(pipeline) == 0
    out_x, out_y = pipeline(x, y, sample_rng(0, 0, 0))
    assert out_x is x and out_y is y


# sample shapes ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", GEOMETRIC)
def test_geometric_ops_refuse_feature_vectors_and_suggest_x_shape(spec):
    name = spec.split(":")[0]
    with pytest.raises(AugmentError, match=rf"{name} needs samples of at least 2 dims.*--x-shape"):
        run(spec.replace("height=12,width=10", "height=1,width=1"), np.ones(10, np.float32))


@pytest.mark.parametrize("spec", VALUE)
def test_value_ops_accept_feature_vectors(spec):
    out, _ = run(spec, np.arange(10, dtype=np.float32))
    assert out.shape == (10,)


def test_output_shape_follows_crop_and_stops_at_custom_ops(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch)
    pipeline = build_pipeline(["flip", "crop:height=12,width=10", "noise"], spatial_targets=False)
    assert pipeline.output_shape((16, 16, 3)) == (12, 10, 3)
    assert build_pipeline(["my_augs:scale", "crop:height=99,width=99"],
                          spatial_targets=False).output_shape((16, 16)) is None


def test_crop_bigger_than_the_sample_is_reported_up_front_and_at_call_time():
    pipeline = build_pipeline(["crop:height=20,width=10"], spatial_targets=False)
    with pytest.raises(AugmentError, match=r"'crop:height=20,width=10'.*bigger than"):
        pipeline.output_shape((16, 16, 3))
    with pytest.raises(AugmentError, match=r"augment op 'crop:height=20,width=10' failed"):
        pipeline(image(), None, sample_rng(0, 0, 0))


def test_output_shape_rejects_geometric_ops_on_feature_vectors():
    with pytest.raises(AugmentError, match=r"--augment 'rotate'.*at least 2 dims"):
        build_pipeline(["noise", "rotate"], spatial_targets=False).output_shape((10,))


# spec grammar -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, params", [
    ("normalize", "normalize", {}),
    ("rotate:degrees=15,p=0.5", "rotate", {"degrees": 15, "p": 0.5}),
    (" flip : axis = 0 , p = 1 ", "flip", {"axis": 0, "p": 1}),
    ("shift:mode=wrap", "shift", {"mode": "wrap"}),
    ("mypkg.augs:warp", "mypkg.augs:warp", {}),
    ("mypkg.augs:warp:strength=2,smooth=true,kind=elastic,scale=1e-3",
     "mypkg.augs:warp", {"strength": 2, "smooth": True, "kind": "elastic", "scale": 0.001}),
    ("augs:warp:flag=False,path=a:b", "augs:warp", {"flag": False, "path": "a:b"}),
])
def test_parse_spec_grammar(text, name, params):
    spec = parse_spec(text)
    assert (spec.name, dict(spec.params), spec.text) == (name, params, text)
    assert all(type(value) is type(params[key]) for key, value in spec.params.items())


@given(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)))
@settings(max_examples=60, deadline=None)
def test_numeric_values_keep_their_type_and_value(value):
    parsed = parse_spec(f"mod:fn:v={value!r}").params["v"]
    assert type(parsed) is type(value) and parsed == value


def test_op_specs_are_read_only_hashable_and_comparable():
    spec = parse_spec("rotate:degrees=15")
    assert spec == parse_spec("rotate:degrees=15") and hash(spec) == hash(parse_spec(spec.text))
    with pytest.raises(TypeError):
        spec.params["degrees"] = 3
    assert OpSpec("flip", {"p": 1}, "flip:p=1") == parse_spec("flip:p=1")


@pytest.mark.parametrize("text, message", [
    ("rotate:degrees=1,degrees=2", "given twice"),
    ("rotate:=3", "empty key or value"),
    ("rotate:degrees=", "empty key or value"),
    ("rotate:", "expected k=v"),
    ("rotate:degrees", "expected k=v"),
    ("rotate:1x=2", "must be a Python identifier"),
    ("rotat:degrees=15", "unknown op 'rotat'; did you mean 'rotate'"),
    ("blur", "unknown op 'blur'"),
    ("./augs.py:warp", "not a file path"),
    ("augs:warp-it", "not a file path"),
])
def test_bad_grammar_is_reported_naming_the_spec(text, message):
    with pytest.raises(AugmentError, match="--augment") as error:
        parse_spec(text)
    assert f"'{text}'" in str(error.value) and message in str(error.value)


def test_empty_spec_is_reported():
    with pytest.raises(AugmentError, match="empty spec"):
        parse_spec("  ")


# validation at build time -----------------------------------------------------------------

def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(AugmentError) as error:
        build_pipeline(["flip", "rotate:degres=15"], spatial_targets=False)
    assert str(error.value) == ("--augment 'rotate:degres=15': unknown parameter 'degres' for "
                                "rotate; known: degrees, p, order, mode")


@pytest.mark.parametrize("text, message", [
    ("rotate:degrees=abc", "degrees must be a number, got 'abc'"),
    ("rotate:degrees=nan", "finite"),
    ("rotate:degrees=200", "degrees must be between 0 and 180"),
    ("rotate:p=1.5", "p must be between 0 and 1"),
    ("rotate:order=1.5", "order must be an integer"),
    ("rotate:mode=sideways", "mode must be one of constant"),
    ("flip:axis=2", "axis must be one of 0, 1"),
    ("flip:axis=true", "axis must be an integer"),
    ("shift:pixels=-1", "pixels must be >= 0"),
    ("shift:mode=grid-wrap", "mode must be one of"),
    ("zoom:range=1", "range must be >= 0 and < 1"),
    ("crop:height=8", "crop needs width"),
    ("crop:height=0,width=4", "must be >= 1"),
    ("noise:std=-1", "std must be >= 0"),
    ("brightness:delta=-0.1", "delta must be >= 0"),
    ("contrast:range=2", "range must be between 0 and 1"),
    ("normalize:mean=0.5", "give both mean and std"),
    ("normalize:mean=0,std=0", "std must be > 0"),
    ("crop:height=8,width=8,p=0.5", "unknown parameter 'p' for crop"),
    ("normalize:p=1", "unknown parameter 'p' for normalize"),
])
def test_bad_parameters_are_reported_naming_the_spec(text, message):
    with pytest.raises(AugmentError) as error:
        build_pipeline([text], spatial_targets=False)
    assert str(error.value).startswith(f"--augment '{text}': ") and message in str(error.value)


def test_a_single_string_instead_of_a_list_is_reported():
    with pytest.raises(AugmentError, match=r"pass \['flip'\]"):
        build_pipeline("flip", spatial_targets=False)


# custom ops -------------------------------------------------------------------------------

def write_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_augs.py").write_text(textwrap.dedent("""
        import numpy as np

        def scale(x, y, rng, factor=2.0, jitter=False):
            shift = rng.uniform(-1, 1) if jitter else 0.0
            return x * factor + shift, y

        def broken(x, y, rng):
            raise RuntimeError("kaboom")

        def one_value(x, y, rng):
            return x

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_custom_op_is_imported_by_dotted_name_and_gets_params_and_rng(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch)
    pipeline = build_pipeline(["my_augs:scale:factor=3,jitter=true", "flip:p=1"],
                              spatial_targets=False)
    x = image((4, 4))
    out, label = pipeline(x, np.int64(2), sample_rng(0, 0, 0))
    draws = sample_rng(0, 0, 0)
    expected = np.flip(x * 3 + draws.uniform(-1, 1), axis=1)
    assert label == 2 and np.allclose(out, expected)
    assert [spec.name for spec in pipeline.specs] == ["my_augs:scale", "flip"]


def test_custom_op_failure_is_wrapped_naming_the_spec(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch)
    pipeline = build_pipeline(["my_augs:broken"], spatial_targets=False)
    with pytest.raises(AugmentError, match=r"^augment op 'my_augs:broken' failed: kaboom$") \
            as error:
        pipeline(image(), None, sample_rng(0, 0, 0))
    assert isinstance(error.value.__cause__, RuntimeError)


def test_custom_op_must_return_a_pair(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch)
    pipeline = build_pipeline(["my_augs:one_value"], spatial_targets=False)
    with pytest.raises(AugmentError, match=r"must return a tuple \(x, y\)"):
        pipeline(image(), None, sample_rng(0, 0, 0))


@pytest.mark.parametrize("text, message", [
    ("no_such_module_xyz:warp", "cannot import module 'no_such_module_xyz'"),
    ("my_augs:missing", "has no attribute 'missing'"),
    ("my_augs:NOT_CALLABLE", "is not callable"),
    ("my_augs:scale:strength=2", "cannot be called as fn(x, y, rng, **params)"),
])
def test_custom_op_problems_are_reported_at_build_time(tmp_path, monkeypatch, text, message):
    write_module(tmp_path, monkeypatch)
    with pytest.raises(AugmentError) as error:
        build_pipeline([text], spatial_targets=False)
    assert f"--augment '{text}'" in str(error.value) and message in str(error.value)


def test_missing_custom_module_says_it_must_be_importable():
    with pytest.raises(AugmentError, match="importable on the server's Python path"):
        build_pipeline(["no_such_module_xyz.sub:warp"], spatial_targets=False)


# help text --------------------------------------------------------------------------------

def test_describe_ops_lists_every_builtin_with_its_defaults():
    text = describe_ops()
    for fragment in ["rotate", "degrees=15", "p=0.5", "order=1", "mode=constant", "flip",
                     "axis=1", "shift", "pixels=4", "zoom", "range=0.1", "crop",
                     "height=<required>", "noise", "std=0.05", "brightness", "delta=0.1",
                     "contrast", "range=0.2", "normalize", "module.path:callable"]:
        assert fragment in text
