"""Timing, FLOP counts and peak rates: what the benchmark and the PyTorch twin share."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax

from vgg_jax import models, spec

# Dense bf16 / fp32 (non-tensor-core) peaks, FLOP/s, by device-kind substring (SXM
# spec sheets; the H200 has the H100's compute).
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
}


def analytic_flops(model: models.VGG, image_size: int) -> int:
    """Forward FLOPs per image: 2 x multiply-adds of the conv (3x3, SAME) and dense layers,
    padding taps included (as the usual VGG counts do)."""
    flops, size, channels = 0, image_size, 3
    for block in model.stages:
        for features in block:
            flops += 2 * size * size * 9 * channels * features
            channels = features
        size //= 2
    size = spec.head_input_side(model.head, size)
    width = size * size * channels
    for features in spec.dense_widths(model.head, model.num_classes):
        flops += 2 * width * features
        width = features
    return flops


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _cpu_mhz(info: dict[str, str]) -> float | None:
    if info.get("CPU max MHz"):
        return float(info["CPU max MHz"])
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo.read())
    except OSError:
        return None
    return float(match.group(1)) if match else None


def cpu_peak(dtype: str) -> tuple[float | None, str]:
    """Estimated peak FLOP/s of this CPU (all cores) and how it was estimated.

    FLOPs/cycle/core for float32: AVX-512 on AMD Zen 4 runs on two 256-bit FMA pipes
    (2 x 8 lanes x 2 = 32), on Intel server cores on two 512-bit FMA units (64); AVX2+FMA
    gives 32. bfloat16 doubles it where the CPU has AVX512_BF16 (dot-product instructions).
    """
    info = _lscpu()
    cpu_flags = set(info.get("Flags", "").split())
    cores = int(info.get("Core(s) per socket", "0") or 0) * int(info.get("Socket(s)", "1") or 1)
    cores = cores or os.cpu_count() or 1
    mhz = _cpu_mhz(info)
    if mhz is None:
        return None, "unknown (no CPU frequency)"
    amd = info.get("Vendor ID") == "AuthenticAMD"
    if "avx512f" in cpu_flags:
        per_cycle, isa = (32, "AVX-512 (Zen 4: 2x256-bit FMA)") if amd else (64, "AVX-512")
    elif "avx2" in cpu_flags and "fma" in cpu_flags:
        per_cycle, isa = 32, "AVX2+FMA"
    else:
        per_cycle, isa = 8, "SSE"
    if dtype == "bfloat16" and "avx512_bf16" in cpu_flags:
        per_cycle, isa = per_cycle * 2, isa + " + AVX512_BF16"
    peak = cores * mhz * 1e6 * per_cycle
    model_name = info.get("Model name", platform.processor())
    how = (
        f"{model_name}: {cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} {dtype} "
        f"FLOPs/cycle ({isa})"
    )
    return peak, how


def device_peak(device: jax.Device, dtype: str) -> tuple[float | None, str]:
    """Assumed peak FLOP/s of one device and where the figure comes from."""
    if device.platform == "cpu":
        return cpu_peak(dtype)
    for kind, peaks in GPU_PEAKS.items():
        if kind in device.device_kind:
            return peaks[dtype], f"{device.device_kind}: {kind} SXM dense {dtype} spec sheet"
    return None, f"{device.device_kind}: unknown peak"


def peak_memory_bytes(device: jax.Device) -> int | None:
    """Peak bytes in use on the device, where the backend reports it (not on CPU)."""
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_steps(
    step: Callable[[], Any],
    steps: int,
    burn_in: int,
    wait: Callable[[Any], Any] | None = jax.block_until_ready,
) -> list[float]:
    """Seconds of each of `steps` calls after `burn_in` untimed ones; each call's result
    waited for with `wait` (JAX's by default: its calls return before the device is done;
    None where a call's work is done when it returns)."""
    wait = wait or (lambda result: result)
    for _ in range(burn_in):
        wait(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        wait(step())
        times.append(time.perf_counter() - start)
    return times


def summarise_times(
    times: list[float],
    batch_size: int,
    flops_per_image: float | None = None,
    peak: float | None = None,
) -> dict[str, Any]:
    """mean/std seconds per batch, images/s and, given the FLOPs per image, TFLOP/s and
    fraction of peak, from the mean as the TF seed did; the median and every step's time
    too: on a shared 2-core machine one slow step can move the mean."""
    mean = statistics.fmean(times)
    figure: dict[str, Any] = {
        "mean_s": mean,
        "std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "median_s": statistics.median(times),
        "times_s": list(times),
        "images_per_s": batch_size / mean,
    }
    if flops_per_image is not None:
        achieved = flops_per_image * batch_size / mean
        figure["flops_per_image_analytic"] = flops_per_image
        figure["tflops"] = achieved / 1e12
        figure["fraction_of_peak"] = achieved / peak if peak else None
    return figure
