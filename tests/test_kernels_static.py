"""The chunk kernels' static gate on sm_90 (#38), without a GPU: the launches of a forward and backward of
ViL-Small's stage 1 (bf16, all bias tables learnt) compiled for an H100 by the installed Triton in every
configuration the autotuner may choose, read back from the cubin, ptxas and the SASS
(benchmarks/kernel_static.py says how).

Gate, for the chunk kernels: no spills in any kernel the chunk path launches, every matrix product of the
forward and backward chunk kernels on Hopper's wgmma (none on mma.sync), and at most 0.3
warp-instructions per score in the forward's inner loop. The query-tile kernels fail the same gate, which
is how we know it can fail. The GPU image runs Triton 3.6; CI runs whatever is installed, and
benchmarks/results/kernel-static-sm90-triton3.6.json holds the 3.6 figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_static  # noqa: E402

MAX_WARP_INSTRUCTIONS_PER_SCORE = 0.3
# The kernels holding each set's matrix products of local queries and keys, and its forward.
PRODUCT_KERNELS = {"chunks": ("fwd_chunk_kernel", "bwd_chunk_dq_kernel", "bwd_chunk_dkdv_kernel",
                              "bwd_chunk_bias_kernel"),
                   "tiles": ("fwd_local_kernel", "bwd_local_dq_kernel", "bwd_local_dkdv_kernel")}
FORWARD = {"chunks": "fwd_chunk_kernel", "tiles": "fwd_local_kernel"}


def gate_failures(kernels: str, figures: dict) -> list[str]:
    """What keeps ``figures`` (kernel_static.kernel_figures) of the ``kernels`` set from passing the gate."""
    failures = []
    missing = set(PRODUCT_KERNELS[kernels]) - set(figures)
    if missing:
        failures.append(f"not launched: {sorted(missing)}")
    for name, rows in figures.items():
        for row in rows:
            where = f"{name} ({row['num_warps']} warps, {row['config']['num_stages']} stages)"
            if row["spill_stores"] or row["spill_loads"] or row["local_instructions"]:
                failures.append(f"{where} spills: {row['spill_stores']} B stored, {row['spill_loads']} B loaded, "
                                f"{row['local_instructions']} local-memory instructions")
            if name not in PRODUCT_KERNELS[kernels]:
                continue
            if not row["wgmma"] or row["mma_sync_instructions"]:
                failures.append(f"{where}: {row['wgmma_instructions']} wgmma, {row['mma_sync_instructions']} "
                                "mma.sync instructions")
            if name == FORWARD[kernels]:
                per_score = (row["inner_loop"] or {}).get("warp_instructions_per_score")
                if per_score is None or per_score > MAX_WARP_INSTRUCTIONS_PER_SCORE:
                    failures.append(f"{where}: {per_score} warp-instructions per score in the inner loop "
                                    f"(at most {MAX_WARP_INSTRUCTIONS_PER_SCORE})")
    return failures


@pytest.fixture(scope="module")
def compiler():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("this process runs Triton's interpreter; the kernels are not compilable objects here")
    reason = kernel_static.tools_missing()
    if reason:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    return kernel_static


@pytest.mark.slow
def test_chunk_kernels_pass_the_sm90_gate_in_every_configuration(compiler):
    from vilscale.kernels import triton_chunks

    figures = compiler.kernel_figures("chunks")
    assert gate_failures("chunks", figures) == []
    for name in PRODUCT_KERNELS["chunks"]:  # every configuration the autotuner may pick was compiled
        assert len(figures[name]) == len(triton_chunks.CHUNK_CONFIGS), name
        assert all(row["shared_bytes"] <= compiler.SM90_MAX_SHARED for row in figures[name]), name


@pytest.mark.slow
def test_the_gate_fails_the_query_tile_kernels(compiler):
    failures = gate_failures("tiles", compiler.kernel_figures("tiles"))
    assert any("per score" in failure for failure in failures), failures
    assert any("mma.sync" in failure for failure in failures), failures


# ----------------------------------------------------------------------------------------------
# the SASS reading, on listings written here (no compiler needed)
# ----------------------------------------------------------------------------------------------

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R1, 0x2, RZ ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, RZ ;
        /*0030*/                   FADD R5, R5, R6 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   NOP ;
        /*0060*/                   FMUL R7, R5, R5 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/                   NOP ;
        /*0090*/                   FFMA R9, R24, R25, R26 ;
        /*00a0*/              @!P1 BRA 0x60 ;
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00c0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00d0*/                   BRA 0xb0 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0 ;
"""


def test_sass_loops_are_cut_at_backward_branches_and_the_inner_loop_holds_the_products():
    instructions = kernel_static.parse_sass(LISTING)
    assert len(instructions) == 16 and instructions[4] == (0x40, "@P0 BRA 0x20")
    # the closing BRA to itself is the trap after EXIT, not a loop
    assert kernel_static.loops(instructions) == [(0x20, 0x40), (0x60, 0xa0), (0xb0, 0xd0)]
    loop = kernel_static.inner_loop(instructions)
    # three loops hold products; the one with the most (two HGMMA) wins
    assert loop["span"] == ["0xb0", "0xd0"] and loop["instructions"] == 3 and loop["mma_instructions"] == 2


def test_of_nested_loops_the_innermost_holding_products_is_the_inner_loop():
    nested = """
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   FADD R5, R5, R6 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/               @P1 BRA 0x0 ;
    """
    loop = kernel_static.inner_loop(kernel_static.parse_sass(nested))
    assert loop["span"] == ["0x10", "0x30"] and loop["instructions"] == 3 and loop["loops_in_kernel"] == 2


def test_nops_do_not_count_and_the_ratio_is_per_warp_and_score():
    body = [line for line in LISTING.splitlines() if any(f"/*{a}*/" in line for a in ("0060", "0070", "0080",
                                                                                       "0090", "00a0"))]
    loop = kernel_static.inner_loop(kernel_static.parse_sass("\n".join(body)))
    assert loop["instructions"] == 4  # FMUL, HGMMA, FFMA, BRA: the NOP is padding
    assert kernel_static.block_scores("fwd_local_kernel", {"TILE_Y": 4, "TILE_X": 8, "KEY_W": 32}) == (32, 32)
