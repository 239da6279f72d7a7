"""The CPU task kernels of mpk/backends/cpu/include/mpk_cpu_kernels.h against the torch
reference of each operator spec (``SPECS[kind].run``), on every SIMD path.

A C++ shim with ``extern "C"`` wrappers around a few instantiations of each kernel is
built three times (the compiler's native path, -DMPK_FORCE_AVX2, -DMPK_FORCE_SCALAR)
and loaded with ctypes. Shapes are chosen so that vectors have tails on both the
16-lane and the 8-lane paths. Output buffers start as NaN, and the reference runs on an
identical NaN-filled copy, so comparing whole buffers also checks that a kernel writes
nothing outside its tile.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mpk.ops import SPECS, Op

INCLUDE_DIR = Path(__file__).resolve().parent.parent / "mpk" / "backends" / "cpu" / "include"
COMPILE_FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-march=native"]
BUILD_FLAGS = {"native": [], "avx2": ["-DMPK_FORCE_AVX2"], "scalar": ["-DMPK_FORCE_SCALAR"]}
TOLERANCE = 1e-5
EPS = 1e-6

# Weight element type: C++ type, torch dtype.
WEIGHT_TYPES = {"f32": ("float", torch.float32), "bf16": ("mpk::bf16", torch.bfloat16)}


@dataclass(frozen=True)
class HeadLayout:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def row(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def attrs(self) -> dict:
        return {"num_heads": self.heads, "num_kv_heads": self.kv_heads, "head_dim": self.head_dim}

    def columns(self, group: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Return the q, k and v column ranges of one KV group in a [q | k | v] row."""
        q_width = self.heads // self.kv_heads * self.head_dim
        k_base = self.heads * self.head_dim
        v_base = k_base + self.kv_heads * self.head_dim
        q = (group * q_width, (group + 1) * q_width)
        k = (k_base + group * self.head_dim, k_base + (group + 1) * self.head_dim)
        v = (v_base + group * self.head_dim, v_base + (group + 1) * self.head_dim)
        return q, k, v


# Head layout A has head_dim 16: whole vectors, but its rotary half of 8 is a tail on 16
# lanes. Layout B has head_dim 40, a tail on 16 lanes, and 10 q heads per group, more
# than the attention kernel's head block of 8.
LAYOUT_A = HeadLayout(heads=6, kv_heads=2, head_dim=16)
LAYOUT_B = HeadLayout(heads=20, kv_heads=2, head_dim=40)

EMBEDDING_SHAPES = [(1, 50, 76), (5, 50, 76)]  # (T, V, H)
RMSNORM_SHAPES = [(1, 200), (5, 76)]  # (T, H)
LINEAR_SHAPES = [(1, 72, 200), (1, 75, 200), (5, 72, 200), (5, 75, 200)]  # (T, K, N)
QK_NORM_CASES = [(5, LAYOUT_A), (1, LAYOUT_B), (5, LAYOUT_B)]  # (T, layout)
ROPE_CASES = [(5, LAYOUT_A, 12, (3, 7, -1, 0, 9)), (1, LAYOUT_B, 12, (11,))]  # (T, layout, S, positions)
# Positions cross the kernel's 16-slot blocks (37 -> 38 slots, 17 -> 18 slots).
ATTENTION_CASES = [(5, LAYOUT_A, 40, (3, 37, -1, 0, 20)), (1, LAYOUT_B, 24, (17,))]
SILU_SHAPES = [(1, 75), (5, 200)]  # (T, I)
ARGMAX_PARTIAL_SHAPES = [(5, 1000, 256), (1, 20, 7), (3, 70, 70)]  # (T, V, CHUNK)
ARGMAX_REDUCE_SHAPES = [(5, 4), (1, 3)]  # (T, P)
# Encoder kernels. Hidden sizes 40 and 76 have tails on both vector paths. Layout C is
# BERT-like (as many KV heads as q heads), with a head_dim tail.
LAYERNORM_SHAPES = [(5, 40), (3, 384)]  # (T, H)
ENCODER_LINEAR_SHAPE = (5, 75, 200)  # (T, K, N)
# The panel kernel: 19 rows are two blocks of 8 and a tail of 3 (AVX-512) or four of 4 and
# a tail of 3 (AVX2); 200 columns are four whole 48-column panels and a partial one.
PANEL_ROWS = (5, 19)
EMBEDDING_SUM_SHAPE = (7, 76, 50, 12, 2)  # (T, H, vocab, positions, token types)
LAYOUT_C = HeadLayout(heads=3, kv_heads=3, head_dim=40)
# Rows per sentence: 3, 2, a padding row, then 11 rows (more than one block of 8), and an
# unused slot with an empty span.
PACKED_SEGMENTS = (0, 0, 0, 1, 1, -1, *([2] * 11))
PACKED_SPANS = ((0, 3), (3, 5), (6, 17), (17, 17))


def wrapper(name: str, params: str, call: str) -> str:
    return f'extern "C" void {name}({params}) {{ {call}; }}\n'


def embedding_name(t: int, h: int, wt: str) -> str:
    return f"embedding_t{t}_h{h}_{wt}"


def rmsnorm_name(h: int, wt: str) -> str:
    return f"rmsnorm_h{h}_{wt}"


def linear_name(t: int, k: int, n: int, wt: str, residual: bool) -> str:
    return f"linear_t{t}_k{k}_n{n}_{wt}_{'res' if residual else 'plain'}"


def qk_norm_name(t: int, layout: HeadLayout, wt: str) -> str:
    return f"qk_norm_t{t}_row{layout.row}_hd{layout.head_dim}_{wt}"


def rope_name(t: int, layout: HeadLayout, s: int) -> str:
    return f"rope_t{t}_row{layout.row}_hd{layout.head_dim}_kv{layout.kv_heads}_s{s}"


def attention_name(t: int, layout: HeadLayout, s: int) -> str:
    return f"attention_t{t}_row{layout.row}_hd{layout.head_dim}_kv{layout.kv_heads}_s{s}"


def shim_source() -> str:
    """Return the C++ source of the test shim: one wrapper per tested instantiation."""
    parts = [
        '#include "mpk_cpu_kernels.h"\n',
        "using mpk::bf16;\n",
        'extern "C" int simd_width() { return mpk::cpu::simd::kWidth; }\n',
        # simd::exp over an array, tail included, to measure its error directly.
        'extern "C" void simd_exp(const float* x, float* y, int n) {\n'
        "    mpk::cpu::detail::for_each_vector(0, n, [&](int i, auto count) {\n"
        "        mpk::cpu::detail::store_n(y + i, mpk::cpu::simd::exp(mpk::cpu::detail::load_n(x + i, count)), count);\n"
        "    });\n"
        "}\n",
    ]
    for wt, (ctype, _) in WEIGHT_TYPES.items():
        for t, _, h in EMBEDDING_SHAPES:
            parts.append(wrapper(
                embedding_name(t, h, wt),
                "const int64_t* tokens, const void* weight, float* out, int c0, int c1",
                f"mpk::cpu::embedding_task<{t}, {h}, {ctype}>(tokens, static_cast<const {ctype}*>(weight), out, c0, c1)",
            ))
        for _, h in RMSNORM_SHAPES:
            parts.append(wrapper(
                rmsnorm_name(h, wt),
                "const float* x, const void* weight, float* out, float eps, int r0, int r1",
                f"mpk::cpu::rmsnorm_task<{h}, {ctype}>(x, static_cast<const {ctype}*>(weight), out, eps, r0, r1)",
            ))
        for t, k, n in LINEAR_SHAPES:
            for residual in (False, True):
                parts.append(wrapper(
                    linear_name(t, k, n, wt, residual),
                    "const float* x, const void* weight, const float* residual, float* out, int c0, int c1",
                    f"mpk::cpu::linear_task<{t}, {k}, {n}, {ctype}, {'true' if residual else 'false'}>"
                    f"(x, static_cast<const {ctype}*>(weight), static_cast<const {ctype}*>(nullptr), residual, out, c0, c1)",
                ))
        for t, layout in QK_NORM_CASES:
            parts.append(wrapper(
                qk_norm_name(t, layout, wt),
                "float* qkv, const void* q_weight, const void* k_weight, float eps, int q0, int q1, int k0, int k1",
                f"mpk::cpu::qk_norm_task<{t}, {layout.row}, {layout.head_dim}, {ctype}>"
                f"(qkv, static_cast<const {ctype}*>(q_weight), static_cast<const {ctype}*>(k_weight), eps, q0, q1, k0, k1)",
            ))
    for t, layout, s, _ in ROPE_CASES:
        parts.append(wrapper(
            rope_name(t, layout, s),
            "float* qkv, const int64_t* positions, const float* cos, const float* sin, float* k_cache, "
            "float* v_cache, int group, int q0, int q1, int k0, int v0",
            f"mpk::cpu::rope_task<{t}, {layout.row}, {layout.head_dim}, {layout.kv_heads}, {s}>"
            "(qkv, positions, cos, sin, k_cache, v_cache, group, q0, q1, k0, v0)",
        ))
    for t, layout, s, _ in ATTENTION_CASES:
        out_cols = layout.heads * layout.head_dim
        parts.append(wrapper(
            attention_name(t, layout, s),
            "const float* qkv, const int64_t* positions, const float* k_cache, const float* v_cache, float* out, "
            "float scale, int group, int r0, int r1, int q0, int q1",
            f"mpk::cpu::attention_task<{t}, {layout.row}, {layout.head_dim}, {layout.kv_heads}, {s}, {out_cols}>"
            "(qkv, positions, k_cache, v_cache, out, scale, group, r0, r1, q0, q1)",
        ))
    for t, i in SILU_SHAPES:
        parts.append(wrapper(
            f"silu_mul_t{t}_i{i}",
            "const float* gate_up, float* out, int c0, int c1",
            f"mpk::cpu::silu_mul_task<{t}, {i}>(gate_up, out, c0, c1)",
        ))
    for t, v, chunk in ARGMAX_PARTIAL_SHAPES:
        p = math.ceil(v / chunk)
        parts.append(wrapper(
            f"argmax_partial_t{t}_v{v}_c{chunk}",
            "const float* logits, float* values, int64_t* indices, int part",
            f"mpk::cpu::argmax_partial_task<{t}, {v}, {p}, {chunk}>(logits, values, indices, part)",
        ))
    for t, p in ARGMAX_REDUCE_SHAPES:
        parts.append(wrapper(
            f"argmax_reduce_t{t}_p{p}",
            "const float* values, const int64_t* indices, int64_t* out",
            f"mpk::cpu::argmax_reduce_task<{t}, {p}>(values, indices, out)",
        ))
    parts.append(encoder_shim_source())
    return "".join(parts)


def encoder_shim_source() -> str:
    """Wrappers of the BERT encoder kernels and of the vector GELU."""
    rows, layouts = len(PACKED_SEGMENTS), (LAYOUT_A, LAYOUT_C)
    parts = [
        'extern "C" void simd_gelu(const float* x, float* y, int n) {\n'
        "    mpk::cpu::detail::for_each_vector(0, n, [&](int i, auto count) {\n"
        "        mpk::cpu::detail::store_n(y + i, mpk::cpu::detail::gelu(mpk::cpu::detail::load_n(x + i, count)), count);\n"
        "    });\n"
        "}\n",
    ]
    t, k, n = ENCODER_LINEAR_SHAPE
    for wt, (ctype, _) in WEIGHT_TYPES.items():
        for t_, h in LAYERNORM_SHAPES:
            parts.append(wrapper(
                f"layernorm_h{h}_{wt}", "const float* x, const void* w, const void* b, float* out, float eps, int r0, int r1",
                f"mpk::cpu::layernorm_task<{h}, {ctype}>(x, static_cast<const {ctype}*>(w), static_cast<const {ctype}*>(b), out, eps, r0, r1)",
            ))
        for act in ("none", "gelu"):
            for residual in ("false", "true") if act == "none" else ("false",):
                parts.append(wrapper(
                    f"linear_bias_{act}_{residual}_{wt}",
                    "const float* x, const void* w, const void* b, const float* residual, float* out, int c0, int c1",
                    f"mpk::cpu::linear_task<{t}, {k}, {n}, {ctype}, {residual}, mpk::cpu::Activation::{act}>"
                    f"(x, static_cast<const {ctype}*>(w), static_cast<const {ctype}*>(b), residual, out, c0, c1)",
                ))
        for rows in PANEL_ROWS:
            for act, residual in (("none", "false"), ("none", "true"), ("gelu", "false")):
                parts.append(wrapper(
                    f"linear_panels_t{rows}_{act}_{residual}_{wt}",
                    "const float* x, const void* w, const void* b, const float* residual, float* out, int c0, int c1",
                    f"mpk::cpu::linear_panels_task<{rows}, {k}, {n}, {ctype}, {residual}, mpk::cpu::Activation::{act}>"
                    f"(x, static_cast<const {ctype}*>(w), static_cast<const {ctype}*>(b), residual, out, c0, c1)",
                ))
        t_, h = EMBEDDING_SUM_SHAPE[:2]
        parts.append(wrapper(
            f"embedding_sum_{wt}", "const int64_t* tokens, const int64_t* positions, const int64_t* types, const void* word, "
            "const void* position, const void* type, float* out, int r0, int r1",
            f"mpk::cpu::embedding_sum_task<{h}, {ctype}>(tokens, positions, types, static_cast<const {ctype}*>(word), "
            f"static_cast<const {ctype}*>(position), static_cast<const {ctype}*>(type), out, r0, r1)",
        ))
    for layout in layouts:
        parts.append(wrapper(
            f"segment_attention_row{layout.row}", "const float* qkv, const int64_t* segments, const int64_t* spans, float* out, "
            "float scale, int r0, int r1, int q0, int q1, int k0, int v0",
            f"mpk::cpu::segment_attention_task<{rows}, {layout.row}, {layout.head_dim}, {layout.heads * layout.head_dim}>"
            "(qkv, segments, spans, out, scale, r0, r1, q0, q1, k0, v0)",
        ))
    for normalize in ("true", "false"):
        parts.append(wrapper(
            f"mean_pool_{normalize}", "const float* x, const int64_t* spans, float* out, int b0, int b1",
            f"mpk::cpu::mean_pool_task<76, {normalize}>(x, spans, out, b0, b1)",
        ))
    return "".join(parts)


def native_widths(compiler: str) -> dict[str, int]:
    """Return the vector width each build must get, from the compiler's -march=native macros."""
    macros = subprocess.run(
        [compiler, "-march=native", "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True, check=True
    ).stdout
    has_avx512 = "#define __AVX512F__ 1" in macros
    has_avx2 = "#define __AVX2__ 1" in macros and "#define __FMA__ 1" in macros
    avx2_width = 8 if has_avx2 else 1
    return {"native": 16 if has_avx512 else avx2_width, "avx2": avx2_width, "scalar": 1}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL]:
    """Build the shim once per SIMD path (in parallel) and load each build."""
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.fail("c++ was not found on PATH; the CPU kernel tests compile a C++20 shim, so install g++ 12 or newer")
    build_dir = tmp_path_factory.mktemp("cpu_kernels")
    source = build_dir / "shim.cpp"
    source.write_text(shim_source())
    builds = {}
    for path, flags in BUILD_FLAGS.items():
        output = build_dir / f"shim_{path}.so"
        command = [compiler, *COMPILE_FLAGS, *flags, f"-I{INCLUDE_DIR}", str(source), "-o", str(output)]
        builds[path] = (output, command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    loaded = {}
    for path, (output, command, process) in builds.items():
        _, errors = process.communicate()
        if process.returncode != 0:
            pytest.fail(f"building the {path} shim failed ({' '.join(command)}):\n{errors}")
        loaded[path] = ctypes.CDLL(str(output))
    widths = native_widths(compiler)
    for path, library in loaded.items():
        library.simd_width.restype = ctypes.c_int
        assert library.simd_width() == widths[path], f"the {path} build got the wrong SIMD path"
    return loaded


@pytest.fixture(params=list(BUILD_FLAGS))
def lib(request: pytest.FixtureRequest, libraries: dict[str, ctypes.CDLL]) -> ctypes.CDLL:
    return libraries[request.param]


def call(library: ctypes.CDLL, name: str, *args) -> None:
    """Call a shim wrapper: tensors and None go as pointers, ints as int, floats as float."""
    converted = []
    for arg in args:
        if arg is None:
            converted.append(ctypes.c_void_p(None))
        elif isinstance(arg, torch.Tensor):
            assert arg.is_contiguous()
            converted.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, float):
            converted.append(ctypes.c_float(arg))
        else:
            converted.append(ctypes.c_int(arg))
    function = getattr(library, name)
    function.argtypes = [type(a) for a in converted]
    function.restype = None
    function(*converted)


def reference(kind: str, tile: tuple[int, ...], bufs: dict[str, torch.Tensor], **attrs) -> None:
    """Run the torch reference of one task, in place on ``bufs``."""
    spec = SPECS[kind]
    inputs = {role: role for role in spec.inputs + spec.optional_inputs if role in bufs}
    outputs = {role: role for role in spec.outputs}
    SPECS[kind].run(Op(kind, f"test.{kind}", inputs, outputs, attrs), tile, bufs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOLERANCE) -> None:
    """Assert NaN in the same places and a relative error (norm) below tol elsewhere."""
    assert actual.shape == expected.shape
    nan_actual, nan_expected = actual.isnan(), expected.isnan()
    assert torch.equal(nan_actual, nan_expected), (
        f"NaN in different places: kernel {int(nan_actual.sum())}, reference {int(nan_expected.sum())}"
    )
    a = actual[~nan_expected].double()
    e = expected[~nan_expected].double()
    error = float((a - e).norm() / e.norm().clamp_min(1e-30))
    assert error < tol, f"relative error {error:.3g} is not below {tol:g}"


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def make_weight(shape: tuple[int, ...], wt: str, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator) * 0.5 + offset
    return weight.to(WEIGHT_TYPES[wt][1])


def test_simd_exp_error_bound(lib: ctypes.CDLL) -> None:
    # The vector exp measures 7.6e-8 (about 1.3 float32 ulp). A bound of 1.5e-7 leaves
    # margin and still fails a polynomial one degree lower.
    x = torch.linspace(-87.0, 88.0, 350_001, dtype=torch.float32)
    y = nan_like(x)
    call(lib, "simd_exp", x, y, x.numel())
    exact = torch.exp(x.double())
    relative = ((y.double() - exact).abs() / exact).max().item()
    assert relative < 1.5e-7, f"max relative error of simd::exp over [-87, 88] is {relative:.3g}"


def test_simd_exp_denormals_and_limits(lib: ctypes.CDLL) -> None:
    # Results below FLT_MIN (x < -87.34) are denormal, and the kernel's exp must stay
    # within two denormal steps (2^-148) of the exact value.
    low = torch.linspace(-103.9, -87.4, 10_001, dtype=torch.float32)
    y = nan_like(low)
    call(lib, "simd_exp", low, y, low.numel())
    absolute = (y.double() - torch.exp(low.double())).abs().max().item()
    assert absolute <= 2.0**-148, f"max absolute error of simd::exp on denormal results is {absolute:.3g}"

    special = torch.tensor([float("inf"), 88.8, 100.0, float("-inf"), -104.5, -200.0, float("nan"), 0.0])
    y = nan_like(special)
    call(lib, "simd_exp", special, y, special.numel())
    assert y[0] == math.inf
    assert y[1] == math.inf
    assert y[2] == math.inf
    assert y[3] == 0.0
    assert y[4] == 0.0
    assert y[5] == 0.0
    assert math.isnan(y[6])
    assert y[7] == 1.0


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, vocab, hidden", EMBEDDING_SHAPES)
def test_embedding_matches_reference(lib: ctypes.CDLL, wt: str, t: int, vocab: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(1)
    weight = make_weight((vocab, hidden), wt, g)
    tokens = torch.randint(0, vocab, (t,), generator=g)
    for tile in [(0, hidden), (5, 69)]:
        out = torch.full((t, hidden), float("nan"))
        expected = out.clone()
        call(lib, embedding_name(t, hidden, wt), tokens, weight, out, *tile)
        reference("embedding", tile, {"tokens": tokens, "weight": weight, "out": expected})
        assert_close(out, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, hidden", RMSNORM_SHAPES)
def test_rmsnorm_matches_reference(lib: ctypes.CDLL, wt: str, t: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn((t, hidden), generator=g) * 3.0
    # A row with mean(x^2) near eps, where leaving out or misplacing eps shows.
    x[-1] *= 1e-3
    weight = make_weight((hidden,), wt, g, offset=1.0)
    for tile in [(0, t), (t // 2, t)]:
        out = torch.full((t, hidden), float("nan"))
        expected = out.clone()
        call(lib, rmsnorm_name(hidden, wt), x, weight, out, EPS, *tile)
        reference("rmsnorm", tile, {"x": x, "weight": weight, "out": expected}, eps=EPS)
        assert_close(out, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, k, n", LINEAR_SHAPES)
def test_linear_matches_reference(lib: ctypes.CDLL, wt: str, t: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn((t, k), generator=g)
    weight = make_weight((n, k), wt, g)
    # (13, 187) leaves two rows after the groups of four.
    for tile in [(0, n), (13, 187)]:
        out = torch.full((t, n), float("nan"))
        expected = out.clone()
        call(lib, linear_name(t, k, n, wt, False), x, weight, None, out, *tile)
        reference("linear", tile, {"x": x, "weight": weight, "out": expected})
        assert_close(out, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, k, n", LINEAR_SHAPES)
def test_linear_residual_matches_reference(lib: ctypes.CDLL, wt: str, t: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn((t, k), generator=g)
    weight = make_weight((n, k), wt, g)
    residual = torch.randn((t, n), generator=g)
    tile = (13, 187)
    out = torch.full((t, n), float("nan"))
    expected = out.clone()
    call(lib, linear_name(t, k, n, wt, True), x, weight, residual, out, *tile)
    reference("linear", tile, {"x": x, "weight": weight, "residual": residual, "out": expected})
    assert_close(out, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, k, n", LINEAR_SHAPES)
def test_linear_residual_in_place(lib: ctypes.CDLL, wt: str, t: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn((t, k), generator=g)
    weight = make_weight((n, k), wt, g)
    hidden = torch.randn((t, n), generator=g)
    expected = hidden.clone()
    tile = (13, 187)
    call(lib, linear_name(t, k, n, wt, True), x, weight, hidden, hidden, *tile)
    reference("linear", tile, {"x": x, "weight": weight, "residual": expected, "out": expected})
    assert_close(hidden, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, layout", QK_NORM_CASES)
def test_qk_norm_matches_reference(lib: ctypes.CDLL, wt: str, t: int, layout: HeadLayout) -> None:
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn((t, layout.row), generator=g) * 2.0
    qkv[-1] *= 1e-3
    q_weight = make_weight((layout.head_dim,), wt, g, offset=1.0)
    k_weight = make_weight((layout.head_dim,), wt, g, offset=1.0)
    expected = qkv.clone()
    for group in range(layout.kv_heads):
        q, k, _ = layout.columns(group)
        call(lib, qk_norm_name(t, layout, wt), qkv, q_weight, k_weight, EPS, *q, *k)
        bufs = {"qkv": expected, "q_weight": q_weight, "k_weight": k_weight, "out": expected}
        reference("qk_norm", (group,), bufs, eps=EPS, **layout.attrs)
        assert_close(qkv, expected)


def rope_tables(s: int, head_dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cos and sin tables: the kernel only indexes them, so any values test it."""
    return torch.randn((s, head_dim), generator=g), torch.randn((s, head_dim), generator=g)


@pytest.mark.parametrize("t, layout, s, positions", ROPE_CASES)
def test_rope_matches_reference(lib: ctypes.CDLL, t: int, layout: HeadLayout, s: int, positions: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn((t, layout.row), generator=g)
    pos = torch.tensor(positions, dtype=torch.int64)
    cos, sin = rope_tables(s, layout.head_dim, g)
    cache_shape = (s, layout.kv_heads, layout.head_dim)
    k_cache = torch.full(cache_shape, float("nan"))
    v_cache = torch.full(cache_shape, float("nan"))
    expected = {"qkv": qkv.clone(), "k_cache": k_cache.clone(), "v_cache": v_cache.clone()}
    for group in range(layout.kv_heads):
        q, k, v = layout.columns(group)
        call(lib, rope_name(t, layout, s), qkv, pos, cos, sin, k_cache, v_cache, group, *q, k[0], v[0])
        bufs = {"qkv": expected["qkv"], "positions": pos, "cos": cos, "sin": sin, "out": expected["qkv"],
                "k_cache": expected["k_cache"], "v_cache": expected["v_cache"]}
        reference("rope", (group,), bufs, **layout.attrs)
        # NaN left in the caches marks every slot the kernel must not have written.
        assert_close(qkv, expected["qkv"])
        assert_close(k_cache, expected["k_cache"])
        assert_close(v_cache, expected["v_cache"])


def test_rope_padding_rows_leave_cache_untouched(lib: ctypes.CDLL) -> None:
    t, layout, s = ROPE_CASES[0][:3]
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn((t, layout.row), generator=g)
    original = qkv.clone()
    pos = torch.full((t,), -1, dtype=torch.int64)
    cos, sin = rope_tables(s, layout.head_dim, g)
    k_cache = torch.randn((s, layout.kv_heads, layout.head_dim), generator=g)
    v_cache = torch.randn((s, layout.kv_heads, layout.head_dim), generator=g)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q, k, v = layout.columns(1)
    call(lib, rope_name(t, layout, s), qkv, pos, cos, sin, k_cache, v_cache, 1, *q, k[0], v[0])
    assert torch.equal(k_cache, k_before)
    assert torch.equal(v_cache, v_before)
    assert torch.all(qkv[:, q[0] : q[1]] == 0)
    assert torch.equal(qkv[:, : q[0]], original[:, : q[0]])
    assert torch.equal(qkv[:, q[1] :], original[:, q[1] :])


@pytest.mark.parametrize("t, layout, s, positions", ATTENTION_CASES)
def test_attention_matches_reference(lib: ctypes.CDLL, t: int, layout: HeadLayout, s: int, positions: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn((t, layout.row), generator=g) * 2.0
    pos = torch.tensor(positions, dtype=torch.int64)
    cache_shape = (s, layout.kv_heads, layout.head_dim)
    k_cache = torch.randn(cache_shape, generator=g)
    v_cache = torch.randn(cache_shape, generator=g)
    # Slots past the largest position hold NaN, so reading one would poison the output.
    k_cache[max(positions) + 1 :] = float("nan")
    v_cache[max(positions) + 1 :] = float("nan")
    scale = 1.0 / math.sqrt(layout.head_dim)
    out_cols = layout.heads * layout.head_dim
    tiles = [(group, 0, t) for group in range(layout.kv_heads)] + [(1, t // 2, t)]
    for group, r0, r1 in tiles:
        out = torch.full((t, out_cols), float("nan"))
        expected = out.clone()
        q, _, _ = layout.columns(group)
        call(lib, attention_name(t, layout, s), qkv, pos, k_cache, v_cache, out, scale, group, r0, r1, *q)
        bufs = {"qkv": qkv, "positions": pos, "k_cache": k_cache, "v_cache": v_cache, "out": expected}
        reference("attention", (group, r0, r1), bufs, scale=scale, **layout.attrs)
        assert_close(out, expected)


def test_attention_reads_no_slot_past_position(lib: ctypes.CDLL) -> None:
    t, layout, s, _ = ATTENTION_CASES[0]
    g = torch.Generator().manual_seed(10)
    qkv = torch.randn((t, layout.row), generator=g)
    scale = 1.0 / math.sqrt(layout.head_dim)
    q, _, _ = layout.columns(0)
    for position in (0, 15, 16, 17, s - 2):
        pos = torch.full((t,), position, dtype=torch.int64)
        k_cache = torch.randn((s, layout.kv_heads, layout.head_dim), generator=g)
        v_cache = torch.randn((s, layout.kv_heads, layout.head_dim), generator=g)
        k_cache[position + 1 :] = float("nan")
        v_cache[position + 1 :] = float("nan")
        out = torch.full((t, layout.heads * layout.head_dim), float("nan"))
        call(lib, attention_name(t, layout, s), qkv, pos, k_cache, v_cache, out, scale, 0, 0, t, *q)
        assert not out[:, q[0] : q[1]].isnan().any(), f"attention at position {position} read a NaN slot"


@pytest.mark.parametrize("t, width", SILU_SHAPES)
def test_silu_mul_matches_reference(lib: ctypes.CDLL, t: int, width: int) -> None:
    g = torch.Generator().manual_seed(11)
    gate_up = torch.randn((t, 2 * width), generator=g) * 4.0
    # Large gates drive exp(-g) to 0 and to inf.
    gate_up[0, :6] = torch.tensor([-100.0, -89.0, -30.0, 30.0, 89.0, 100.0])
    for tile in [(0, width), (3, width - 1)]:
        out = torch.full((t, width), float("nan"))
        expected = out.clone()
        call(lib, f"silu_mul_t{t}_i{width}", gate_up, out, *tile)
        reference("silu_mul", tile, {"gate_up": gate_up, "out": expected})
        assert_close(out, expected)


def argmax_logits(t: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """Logits with the hard cases: ties, NaN, infinities and all-negative rows."""
    logits = torch.randn((t, vocab), generator=g)
    if t >= 3:
        # Ties in several lanes of one chunk, some lanes above the winner's (5) on both
        # 8 and 16 lanes, and in later chunks.
        top = float(logits[1].max()) + 1.0
        for column in (vocab - 1, vocab // 2 + 17, vocab // 2, 30, 9, 40, 18, 5):
            logits[1, column] = top
        logits[2, vocab // 3] = math.inf
        logits[2, vocab // 2] = math.nan
        logits[2, vocab - 2] = math.nan
    if t >= 5:
        logits[3, vocab // 2 :] = -math.inf
        logits[4] = -logits[4].abs() - 1.0
    return logits


@pytest.mark.parametrize("t, vocab, chunk", ARGMAX_PARTIAL_SHAPES)
def test_argmax_partial_matches_reference(lib: ctypes.CDLL, t: int, vocab: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(12)
    logits = argmax_logits(t, vocab, g)
    parts = math.ceil(vocab / chunk)
    values = torch.full((t, parts), float("nan"))
    indices = torch.full((t, parts), -7, dtype=torch.int64)
    expected = {"logits": logits, "values": values.clone(), "indices": indices.clone()}
    for part in range(parts):
        call(lib, f"argmax_partial_t{t}_v{vocab}_c{chunk}", logits, values, indices, part)
        reference("argmax_partial", (part,), expected, chunk=chunk)
    assert torch.equal(indices, expected["indices"])
    assert torch.equal(values.isnan(), expected["values"].isnan())
    finite = ~values.isnan()
    assert torch.equal(values[finite], expected["values"][finite])


@pytest.mark.parametrize("t, parts", ARGMAX_REDUCE_SHAPES)
def test_argmax_reduce_matches_reference(lib: ctypes.CDLL, t: int, parts: int) -> None:
    g = torch.Generator().manual_seed(13)
    values = torch.randn((t, parts), generator=g)
    values[0, parts - 1] = values[0, 0] = float(values[0].max()) + 1.0
    if t >= 3:
        values[1, 1] = math.nan
        values[2] = -math.inf
    indices = torch.randint(0, 1000, (t, parts), generator=g)
    out = torch.full((t,), -7, dtype=torch.int64)
    expected = out.clone()
    call(lib, f"argmax_reduce_t{t}_p{parts}", values, indices, out)
    reference("argmax_reduce", (0,), {"values": values, "indices": indices, "out": expected})
    assert torch.equal(out, expected)


def test_simd_gelu_error_bound(lib: ctypes.CDLL) -> None:
    # Relative to the exact GELU, 0.5 * x * erfc(-x / sqrt(2)) in float64, down the
    # negative tail where gelu is tiny. (torch's own gelu computes 1 + erf(x / sqrt(2)),
    # which cancels to 0 below x = -8.4 even in float64, so it cannot be the yardstick.)
    x = torch.cat([torch.linspace(-12.0, 12.0, 240_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    y = nan_like(x)
    call(lib, "simd_gelu", x, y, x.numel())
    wide = x.double()
    exact = 0.5 * wide * torch.special.erfc(-wide / math.sqrt(2.0))
    relative = (y.double() - exact).abs() / exact.abs().clamp_min(1e-37)
    # exp(-x^2 / 2) takes an argument whose float32 rounding alone is a relative error of
    # about x^2 / 2 * 6e-8: measured 1.1e-6 near x = -3 and 1.4e-5 at x = -12, where
    # |gelu| < 0.004 and 1e-31. A wrong coefficient gives errors of 1e-4 and more.
    core, tail = relative[x > -3].max().item(), relative[x <= -3].max().item()
    assert core < 1.5e-6, f"max relative error of the vector GELU over [-3, 12] is {core:.3g}"
    special = torch.tensor([float("inf"), float("nan"), 0.0])
    y = nan_like(special)
    call(lib, "simd_gelu", special, y, special.numel())
    assert y[0] == math.inf
    assert math.isnan(y[1])
    assert y[2] == 0.0
    assert tail < 2e-5, f"max relative error of the vector GELU over [-12, -3] is {tail:.3g}"


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("t, hidden", LAYERNORM_SHAPES)
def test_layernorm_matches_reference(lib: ctypes.CDLL, wt: str, t: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(21)
    # A large common offset: a one-pass variance would lose digits to cancellation.
    x = torch.randn((t, hidden), generator=g) * 3.0 + 50.0
    weight, bias = make_weight((hidden,), wt, g, offset=1.0), make_weight((hidden,), wt, g)
    for tile in [(0, t), (1, t - 1)]:
        out = torch.full((t, hidden), float("nan"))
        expected = out.clone()
        call(lib, f"layernorm_h{hidden}_{wt}", x, weight, bias, out, 1e-12, *tile)
        reference("layernorm", tile, {"x": x, "weight": weight, "bias": bias, "out": expected}, eps=1e-12)
        assert_close(out, expected)
    # In place, as the encoder graph runs it.
    in_place = x.clone()
    call(lib, f"layernorm_h{hidden}_{wt}", in_place, weight, bias, in_place, 1e-12, 0, t)
    expected = x.clone()
    reference("layernorm", (0, t), {"x": x.clone(), "weight": weight, "bias": bias, "out": expected}, eps=1e-12)
    assert_close(in_place, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("act, residual", [("none", False), ("none", True), ("gelu", False)])
def test_linear_bias_and_gelu_match_reference(lib: ctypes.CDLL, wt: str, act: str, residual: bool) -> None:
    t, k, n = ENCODER_LINEAR_SHAPE
    g = torch.Generator().manual_seed(22)
    x = torch.randn((t, k), generator=g)
    weight, bias = make_weight((n, k), wt, g), make_weight((n,), wt, g)
    res = torch.randn((t, n), generator=g) if residual else None
    for tile in [(0, n), (3, 101)]:
        out = torch.full((t, n), float("nan"))
        expected = out.clone()
        call(lib, f"linear_bias_{act}_{str(residual).lower()}_{wt}", x, weight, bias, res, out, *tile)
        bufs = {"x": x, "weight": weight, "bias": bias, "out": expected}
        if residual:
            bufs["residual"] = res
        reference("linear", tile, bufs, activation=act)
        assert_close(out, expected)


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
def test_embedding_sum_matches_reference(lib: ctypes.CDLL, wt: str) -> None:
    t, hidden, vocab, positions, types = EMBEDDING_SUM_SHAPE
    g = torch.Generator().manual_seed(23)
    tables = {"word": make_weight((vocab, hidden), wt, g), "position": make_weight((positions, hidden), wt, g),
              "token_type": make_weight((types, hidden), wt, g)}
    ids = {"tokens": torch.randint(0, vocab, (t,), generator=g), "positions": torch.randint(0, positions, (t,), generator=g),
           "token_types": torch.randint(0, types, (t,), generator=g)}
    for tile in [(0, t), (2, 5)]:
        out = torch.full((t, hidden), float("nan"))
        expected = out.clone()
        call(lib, f"embedding_sum_{wt}", ids["tokens"], ids["positions"], ids["token_types"], tables["word"],
             tables["position"], tables["token_type"], out, *tile)
        reference("embedding_sum", tile, {**ids, **tables, "out": expected})
        assert_close(out, expected)


@pytest.mark.parametrize("layout", [LAYOUT_A, LAYOUT_C], ids=["gqa", "bert"])
def test_segment_attention_matches_reference(lib: ctypes.CDLL, layout: HeadLayout) -> None:
    rows = len(PACKED_SEGMENTS)
    g = torch.Generator().manual_seed(24)
    qkv = torch.randn((rows, layout.row), generator=g) * 2.0
    # The padding row's k and v are NaN: a sentence that attended to it would be poisoned.
    qkv[5] = float("nan")
    segments = torch.tensor(PACKED_SEGMENTS, dtype=torch.int64)
    spans = torch.tensor(PACKED_SPANS, dtype=torch.int64)
    scale = layout.head_dim ** -0.5
    out_cols = layout.heads * layout.head_dim
    tiles = [(group, 0, rows) for group in range(layout.kv_heads)] + [(1, 4, 13)]
    for group, r0, r1 in tiles:
        out = torch.full((rows, out_cols), float("nan"))
        expected = out.clone()
        q, k, v = layout.columns(group)
        call(lib, f"segment_attention_row{layout.row}", qkv, segments, spans, out, scale, r0, r1, q[0], q[1], k[0], v[0])
        bufs = {"qkv": qkv, "segments": segments, "spans": spans, "out": expected}
        reference("segment_attention", (group, r0, r1), bufs, scale=scale, **layout.attrs)
        assert_close(out, expected)
        assert not out[r0:r1, q[0] : q[1]].isnan().any(), "a sentence read another sentence's or a padding row"


@pytest.mark.parametrize("normalize", [True, False])
def test_mean_pool_matches_reference(lib: ctypes.CDLL, normalize: bool) -> None:
    rows, hidden = len(PACKED_SEGMENTS), 76
    g = torch.Generator().manual_seed(25)
    x = torch.randn((rows, hidden), generator=g) + 0.5
    x[5] = float("nan")  # the padding row belongs to no span
    spans = torch.tensor(PACKED_SPANS, dtype=torch.int64)
    outputs = []
    for tile in [(0, len(PACKED_SPANS)), (1, 3)]:
        out = torch.full((len(PACKED_SPANS), hidden), float("nan"))
        expected = out.clone()
        call(lib, f"mean_pool_{str(normalize).lower()}", x, spans, out, *tile)
        reference("mean_pool", tile, {"x": x, "spans": spans, "out": expected}, normalize=normalize)
        assert_close(out, expected)
        outputs.append(out)
    whole = outputs[0]
    if normalize:
        norms = whole[:3].double().norm(dim=1)
        assert torch.allclose(norms, torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert torch.equal(whole[3], torch.zeros(hidden)), "an empty span must pool to zeros"


@pytest.mark.parametrize("wt", list(WEIGHT_TYPES))
@pytest.mark.parametrize("rows", PANEL_ROWS)
@pytest.mark.parametrize("act, residual", [("none", False), ("none", True), ("gelu", False)])
def test_linear_panels_match_reference(lib: ctypes.CDLL, wt: str, rows: int, act: str, residual: bool) -> None:
    from mpk.backends.cpu.codegen import pack_panels

    _, k, n = ENCODER_LINEAR_SHAPE
    g = torch.Generator().manual_seed(26)
    x = torch.randn((rows, k), generator=g)
    weight, bias = make_weight((n, k), wt, g), make_weight((n,), wt, g)
    packed = pack_panels(weight)
    assert packed.shape == (5, k, 48)
    res = torch.randn((rows, n), generator=g) if residual else None
    # Whole panels, tiles that start and end inside panels and vectors, one inside a panel.
    for tile in [(0, n), (3, 101), (96, n), (40, 57)]:
        out = torch.full((rows, n), float("nan"))
        expected = out.clone()
        call(lib, f"linear_panels_t{rows}_{act}_{str(residual).lower()}_{wt}", x, packed, bias, res, out, *tile)
        bufs = {"x": x, "weight": weight, "bias": bias, "out": expected}
        if residual:
            bufs["residual"] = res
        reference("linear", tile, bufs, activation=act)
        assert_close(out, expected)
    if residual:
        # In place on the residual, as the encoder's output projections run.
        in_place = res.clone()
        call(lib, f"linear_panels_t{rows}_none_true_{wt}", x, packed, bias, in_place, in_place, 0, n)
        expected = torch.empty_like(res)
        reference("linear", (0, n), {"x": x, "weight": weight, "bias": bias, "residual": res.clone(), "out": expected})
        assert_close(in_place, expected)
