"""`lcq env`: what this machine gives lcq, for a bug report or an operator's check (vLLM's `collect-env`): the
versions of lcq and the packages it uses, the CPU and which of the C kernels' product forms it takes, the GPUs and
whether lcq ships their pre-tuned configs, and the settings in the environment (secrets masked).

Importing this module loads nothing heavy (bench/records.py takes cpu_name from it where torch is not installed);
the report imports torch and the kernels when it is asked for, and does not build the C kernels.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "numpy", "fastapi", "uvicorn", "pydantic",
            "prometheus-client", "xgrammar", "huggingface-hub", "openai")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_int8", "amx_bf16")
SETTINGS = ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "HF_HOME",
            "HF_HUB_OFFLINE", "HF_ENDPOINT", "VLLM_API_KEY")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers: a VM's "AMD EPYC" alone does not tell a
    Zen 4 (family 25) from a Zen 5 (family 26), whose 512-bit units run twice the multiply-adds."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {info['cpu family']}, model {info['model']})" if "cpu family" in info else name


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The checkout's commit, where lcq runs from a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return done.stdout.strip() or None


def _settings() -> dict[str, str]:
    """LCQ_* and the other variables lcq reads, secrets as '(set)'."""
    named = {name: value for name, value in os.environ.items() if name.startswith("LCQ_") or name in SETTINGS}
    return {name: "(set)" if any(word in name for word in SECRET_WORDS) else value
            for name, value in sorted(named.items())}


def _cpu() -> dict:
    import torch

    from lcq.kernels import native
    from lcq.kernels.cpu_matmul import PRODUCT_FORMS
    from lcq.paths import cache_dir

    flags = native.cpu_flags()
    reason = native.unsupported()
    built = (native.FOLDER / native.library_name()).is_file() or \
        (cache_dir() / "native" / native.library_name()).is_file() if reason is None else False
    products = [str(dtype).removeprefix("torch.") for dtype, (_, needs) in PRODUCT_FORMS.items()
                if dtype != torch.float32 and all(native.has_avx512(flag) for flag in needs)]
    return {"name": cpu_name(), "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags],
            "c_kernels": "available" if reason is None else f"not used: {reason}",
            "c_kernels_built": built, "several_row_products": products or ["float32"],
            "amx": native.amx_allowed(), "torch_threads": torch.get_num_threads()}


def _gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpu = {"name": properties.name, "capability": f"sm_{properties.major}{properties.minor}",
               "memory_GiB": round(properties.total_memory / 2**30, 1)}
        try:
            import triton

            from lcq.kernels.tuned_configs import TABLES, device_slug, release, table
        except ImportError:
            gpu["pretuned_configs"] = "no triton"
        else:
            path = TABLES / f"{device_slug(properties.name)}.json"
            written = json.loads(path.read_text()).get("triton", "") if path.is_file() else None
            gpu["pretuned_configs"] = "none for this GPU" if written is None else \
                f"{len(table(device_slug(properties.name)))} (Triton {written})" \
                if release(written) == release(triton.__version__) else \
                f"none for Triton {triton.__version__} (the table is Triton {written}'s)"
        gpus.append(gpu)
    return gpus


def report() -> dict:
    from lcq import __version__

    import torch

    return {"lcq": {"version": __version__, "path": str(Path(__file__).resolve().parent), "commit": _commit()},
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": {name: _version(name) for name in PACKAGES},
            "torch_cuda": torch.version.cuda, "cpu": _cpu(), "gpus": _gpus(), "settings": _settings()}


def as_text(info: dict) -> str:
    lcq = info["lcq"]
    commit = f", commit {lcq['commit']}" if lcq["commit"] else ""
    installed = [f"{name} {version}" for name, version in info["packages"].items() if version]
    missing = [name for name, version in info["packages"].items() if not version]
    cpu = info["cpu"]
    lines = [f"lcq {lcq['version']} ({lcq['path']}{commit})",
             f"python {info['python']} on {info['platform']}",
             "packages: " + ", ".join(installed) + (f"; not installed: {', '.join(missing)}" if missing else ""),
             f"torch CUDA build: {info['torch_cuda'] or 'none (CPU build)'}",
             f"cpu: {cpu['name']}, {cpu['cores']} cores, {cpu['torch_threads']} torch threads; "
             f"flags: {' '.join(cpu['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}",
             f"C kernels: {cpu['c_kernels']}" + ("" if cpu["c_kernels"] != "available" else
                                                  " (built)" if cpu["c_kernels_built"] else " (built on first use)"),
             f"products of several rows on CPU: {', '.join(cpu['several_row_products'])}; AMX tiles: "
             f"{'yes' if cpu['amx'] else 'no'}"]
    lines += [f"gpu {i}: {g['name']}, {g['capability']}, {g['memory_GiB']} GiB; pre-tuned configs: "
              f"{g['pretuned_configs']}" for i, g in enumerate(info["gpus"])] or ["gpus: none"]
    lines.append("settings: " + (", ".join(f"{k}={v}" for k, v in info["settings"].items()) or "none"))
    return "\n".join(lines)


def _env(args: argparse.Namespace) -> None:
    info = report()
    print(json.dumps(info, indent=1) if args.json else as_text(info))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("env", help="what this machine gives lcq (versions, CPU, GPUs), for a bug report",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="as one JSON object")
    p.set_defaults(func=_env)
