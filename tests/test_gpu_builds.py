"""The GPU kernels' builds for architectures other than the H100's, compiled here by the installed Triton and its
ptxas without a GPU (bench/gpu_builds.py), and what the runtime does where a build does not fit a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402 (past the skip without triton)

from lcq.kernels import paged_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None) -> str:
    """What `code` prints, run in a process of its own without the interpreter (compiles are real there)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "0", **(env or {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_default_kernels_build_and_fit_a_t4_and_an_rtx_50():
    """Every default linear form (the autotuned ones with the narrowest config of their lists), both attention
    kernels at head 256 with their three stages of tiles and the rotation with the cache write, in fp16, built for
    sm_75 (a T4: 64 KB of shared memory a block, no cp.async) and sm_120 (consumer Blackwell: 99 KB): each
    assembles and fits. The bf16 build of byte codebooks is refused for sm_75 (cvt.rn.bf16x2 needs sm_80), which is
    why the runtime does not take them there (triton_linear._byte_book_dtype), and built for sm_80."""
    code = ("import json, sys; sys.path.insert(0, '.'); from bench.gpu_builds import builds, compile_kernel, "
            "LINEAR_FORMS; rows = builds([75, 120], dtypes=('fp16',), head_dims=(256,)); "
            "args, options = LINEAR_FORMS['byte codebooks, 32 rows, W2 r2']; refused = []\n"
            "for arch in (75, 80):\n"
            "    try:\n"
            "        compile_kernel(*args, **options, dtype='bf16', arch=arch)\n"
            "    except Exception as error:\n"
            "        refused.append(arch if 'bf16x2' in str(error) else str(error)[-300:])\n"
            "print(json.dumps(dict(rows=rows, refused=refused)))")
    result = json.loads(_run(code).splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 2 * (10 + 2 + 1)  # the linear forms, the attention kernels, the rotation and cache write
    assert [(r["arch"], r["kernel"]) for r in rows if not (r["built"] and r["fits"])] == []
    assert {r.get("stages") for r in rows if "attention" in r["kernel"]} == {3}
    assert result["refused"] == [75]


class _SharedMemoryBound:
    """Triton's launch of a build that holds more shared memory than the GPU gives a block from two stages of tiles
    on (fp32 prefill at head 256 on an sm_86 card: 100 KB of 99), as Triton refuses it before anything runs."""

    def __init__(self) -> None:
        self.launches: list[int] = []

    def __getitem__(self, grid: tuple):
        def launch(*args, STAGES: int, **constants) -> None:
            self.launches.append(STAGES)
            if STAGES > 1:
                raise OutOfResources(102528, 101376, "shared memory")
        return launch


def test_attention_launches_with_fewer_stages_where_its_build_exceeds_shared_memory(monkeypatch):
    """The launch steps down from the stages asked for to the most whose build fits, and later launches of the same
    build go straight to it; a build that does not fit with one stage raises Triton's error; another build, or
    other stages asked for (LCQ_ATTENTION_STAGES), is tried afresh."""
    kernel = _SharedMemoryBound()
    q, cache = torch.zeros(2, 4, 256), torch.zeros(3, 16, 1, 256)
    constants = dict(HEAD_DIM=256, WINDOW=0)
    paged_attention._launch_within_shared_memory(kernel, (1,), (q, cache), constants)
    paged_attention._launch_within_shared_memory(kernel, (1,), (q, cache), constants)
    assert kernel.launches == [3, 2, 1, 1]
    paged_attention._launch_within_shared_memory(kernel, (1,), (q, cache), dict(constants, WINDOW=128))
    monkeypatch.setenv("LCQ_ATTENTION_STAGES", "2")
    paged_attention._launch_within_shared_memory(kernel, (1,), (q, cache), constants)
    assert kernel.launches == [3, 2, 1, 1, 3, 2, 1, 2, 1]

    class Refused(_SharedMemoryBound):
        def __getitem__(self, grid: tuple):
            def launch(*args, STAGES: int, **constants) -> None:
                raise OutOfResources(98304, 65536, "shared memory")
            return launch

    with pytest.raises(OutOfResources, match="Required: 98304"):
        paged_attention._launch_within_shared_memory(Refused(), (1,), (q, cache), constants)


def test_kernels_keep_fused_multiply_adds_unless_the_user_says_otherwise():
    """Importing the kernels sets Triton's default of fused multiply-adds on (Triton 3.10 turns it off where
    TRITON_DEFAULT_FP_FUSION is unset), and keeps a value the user set."""
    code = "import os, lcq.kernels; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_DEFAULT_FP_FUSION"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=env)
    assert result.stdout.split()[-1] == "1", result.stderr[-2000:]
    assert _run(code, {"TRITON_DEFAULT_FP_FUSION": "0"}).split()[-1] == "0"


def test_tuning_key_is_the_autotuners_own():
    """compile_ahead skips a launch whose key the autotuner has chosen for: its key is the one the installed
    Triton's autotuner files its choice under (run here in the interpreter, on a kernel of its own)."""
    import triton.language as tl

    from lcq.kernels.compile_ahead import tuning_key

    @triton.jit
    def add(x_ptr, y_ptr, n, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + SHIFT, mask=offs < n)

    def timed_once(kernel_call, quantiles=None):
        kernel_call()
        return [1.0, 1.0, 1.0]

    tuned = triton.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n", "SHIFT"],
                            do_bench=timed_once)(add)
    x = torch.arange(40, dtype=torch.float32)
    y = torch.empty_like(x)
    tuned[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40, SHIFT=2)
    assert torch.equal(y, x + 2)
    assert list(tuned.cache) == [tuning_key(tuned, (x, y, 40), {"SHIFT": 2})]
    assert tuning_key(tuned, (x, y, 41), {"SHIFT": 2}) not in tuned.cache


def test_configs_are_compiled_ahead_only_in_a_warm_up_of_cuda_launches():
    """compile_ahead asks for the configs (and compiles them) only within compiling_ahead() and for CUDA launches:
    elsewhere a launch pays nothing for it."""
    from lcq.kernels import triton_linear
    from lcq.kernels.compile_ahead import compile_ahead, compiling_ahead

    asked = []
    args, constants = (torch.zeros(1, 8), torch.zeros(8)), {"BITS": 2}
    compile_ahead(triton_linear._decode_tuned, lambda: asked.append("outside") or [], args, constants)
    with compiling_ahead():
        compile_ahead(triton_linear._decode_tuned, lambda: asked.append("cpu") or [], args, constants)
    assert asked == []


def test_autotune_table_reads_the_autotuners_own_files(tmp_path):
    """bench/autotune_table.py on files written as Triton's autotuner writes them (cache_results: the key, then each
    config's __dict__ and its timing's quantiles, inf for a build that failed) and named as gpu_session.sh copies
    them: per kernel and key the fastest config, the runner-up, the failures and the configs within 5%."""
    from bench.autotune_table import markdown, table
    from lcq.kernels import triton_linear

    names = triton_linear._decode_tuned.keys
    key = [4096, 11008, 2, 2, 128, 1, False, False, True, False, False, 0, False, False][:len(names)] + \
        ["torch.float16"]
    configs = [(triton.Config({"BLOCK_N": 256, "SPLIT_K": 16}, num_warps=2), [0.0180, 0.0178, 0.0183]),
               (triton.Config({"BLOCK_N": 128, "SPLIT_K": 32}, num_warps=4), [0.0176, 0.0175, 0.0179]),
               (triton.Config({"BLOCK_N": 512, "SPLIT_K": 8}, num_warps=4), [float("inf")] * 3),
               (triton.Config({"BLOCK_N": 64, "SPLIT_K": 64}, num_warps=2), [0.0251, 0.0249, 0.0255])]
    folder = tmp_path / "autotune"
    folder.mkdir()
    (folder / "3f2a-_decode_kernel.autotune.json").write_text(json.dumps(
        {"key": key, "configs_timings": [(config.__dict__, timing) for config, timing in configs]}))
    [row] = table(folder)
    assert row["kernel"] == "_decode_kernel" and row["key"]["N"] == 4096 and row["dtypes"] == ["torch.float16"]
    assert row["config"].startswith("BLOCK_N: 128, SPLIT_K: 32, num_warps: 4")
    assert (row["ms"], row["runner_up_ms"], row["configs"], row["failed"], row["near_best"]) == \
        (0.0176, 0.0180, 4, 1, 2)
    assert "| _decode_kernel | N=4096, K=11008" in markdown([row])


def test_autotune_table_writes_the_gpus_pretuned_configs(tmp_path):
    """bench/autotune_table.py --pretuned: per kernel and key the fastest config in the form lcq/kernels/tuned_configs
    reads, with the Triton version the session's device.txt names; without one, one line and exit 2."""
    folder = tmp_path / "gpu-session" / "autotune"
    folder.mkdir(parents=True)
    key = [4096, 4096, 2, 2, 128, 1, "torch.float16"]
    configs = [(triton.Config({"BLOCK_N": 256, "SPLIT_K": 16}, num_warps=2), [0.0180] * 3),
               (triton.Config({"BLOCK_N": 64, "SPLIT_K": 16}, num_warps=2), [0.0124] * 3)]
    (folder / "aa-_decode_kernel.autotune.json").write_text(json.dumps(
        {"key": key, "configs_timings": [(config.__dict__, timing) for config, timing in configs]}))
    out = tmp_path / "tuned" / "nvidia-h100-80gb-hbm3.json"
    command = [sys.executable, str(ROOT / "bench" / "autotune_table.py"), str(folder), "--pretuned", str(out)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and not out.exists()
    (folder.parent / "device.txt").write_text("name, driver_version\nNVIDIA H100 80GB HBM3, 580.159.04\n"
                                              "lcq 0.1.0 (/x/lcq)\npython 3.12.3 on Linux\n"
                                              "packages: torch 2.11.0+cu130, triton 3.6.0, transformers 5.0.0\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert written["triton"] == "3.6.0" and written["entries"] == [
        {"kernel": "_decode_kernel", "key": key,
         "config": {"kwargs": {"BLOCK_N": 64, "SPLIT_K": 16}, "num_warps": 2, "num_stages": 3, "num_ctas": 1}}]
