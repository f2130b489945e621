"""Per-kernel device times of a timed call: ``benchmarks/gpu_bench.py --profile``.

Where the time of one fwd or fwd+bwd call goes, kernel by kernel, for fwjax and for
flash-linear-attention alike, measured in the process that timed the call (no second compile):

- fwjax: :func:`jax.profiler.trace` of a few calls, read back as :class:`jax.profiler.ProfileData`
  (the XSpace the profiler writes). On a GPU the device plane (``/device:GPU:0``) holds one event
  per kernel launch or copy on its stream lines (``Stream #<id>(…)``, XLA's CUPTI collector);
  lines derived from the same launches (``XLA Ops``, ``XLA Modules``, …) would count them twice,
  so only the stream lines are read, every event in full (kernels on one stream may overlap
  briefly under programmatic dependent launch). On CPU (the smoke run) there is no device plane:
  the host plane's events with an ``hlo_op`` stat are the thunks XLA ran, a loop's body nested in
  the loop's event.
- fla: :mod:`torch.profiler` with CUDA activity; each kernel's self device time.

While profiling, XLA runs without CUDA graphs (its default), so ``wall_us_per_call`` of a profile
is not the timed median; the per-kernel times are the kernels'.

Both give, per kernel name, the launches and the device time per call, largest first.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from collections.abc import Callable, Iterable

# Lines of a GPU device plane derived from its stream lines (the same launches again).
DERIVED_LINES = frozenset(
    {
        "XLA Ops",
        "XLA Modules",
        "XLA TraceMe",
        "Framework Ops",
        "Framework Name Scope",
        "Source code",
        "Steps",
        "Launch Stats",
        "TensorFlow Ops",
        "TensorFlow Name Scope",
    }
)


def xspace_kernels(space) -> Iterable[tuple[str, float]]:
    """``(kernel name, duration in ns)`` of every kernel event of a profile.

    Args:
      space: a :class:`jax.profiler.ProfileData`.

    Yields:
      With GPU planes (``/device:GPU:…``), every event of their stream lines (``Stream #…``),
      or of every line not in :data:`DERIVED_LINES` where a plane names none; without, the
      host CPU plane's events that carry an ``hlo_op`` stat (XLA:CPU's thunks), leaving out
      those contained in another (a loop's body is part of the loop's time).
    """
    planes = list(space.planes)
    gpus = [p for p in planes if p.name.startswith("/device:GPU:")]
    if gpus:
        for plane in gpus:
            lines = list(plane.lines)
            streams = [line for line in lines if line.name.startswith("Stream")]
            for line in streams or [line for line in lines if line.name not in DERIVED_LINES]:
                for event in line.events:
                    yield event.name, event.duration_ns
        return
    for plane in planes:
        if plane.name == "/host:CPU":
            for line in plane.lines:
                yield from _outermost(e for e in line.events if "hlo_op" in dict(e.stats))


def _outermost(events) -> Iterable[tuple[str, float]]:
    """The events of one line not contained in an earlier one."""
    end = float("-inf")
    for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        if event.start_ns + event.duration_ns > end:
            end = event.start_ns + event.duration_ns
            yield event.name, event.duration_ns


def summarise(kernels: Iterable[tuple[str, float, int]], calls: int, top: int = 12) -> dict:
    """Per-call totals of ``(name, total ns, launches)`` rows (a name may repeat).

    Returns:
      ``dict(calls, device_us_per_call, kernels=[dict(name, launches_per_call, us_per_call,
      share)] (the ``top`` largest), other_us_per_call)``: ``share`` is the kernel's part of
      the device time; ``other_us_per_call`` the time of the kernels past ``top``.
    """
    if calls < 1:
        raise ValueError(f"{calls=} must be positive")
    time_ns: dict[str, float] = collections.defaultdict(float)
    launches: dict[str, int] = collections.defaultdict(int)
    for name, ns, count in kernels:
        time_ns[name] += ns
        launches[name] += count
    total_ns = sum(time_ns.values())
    ranked = sorted(time_ns, key=time_ns.__getitem__, reverse=True)
    rows = [
        {
            "name": name,
            "launches_per_call": launches[name] / calls,
            "us_per_call": time_ns[name] / calls / 1e3,
            "share": time_ns[name] / total_ns if total_ns else 0.0,
        }
        for name in ranked[:top]
    ]
    return {
        "calls": calls,
        "device_us_per_call": total_ns / calls / 1e3,
        "kernels": rows,
        "other_us_per_call": sum(time_ns[n] for n in ranked[top:]) / calls / 1e3,
    }


def jax_kernel_times(call: Callable[[], object], calls: int = 3, top: int = 12) -> dict:
    """Traces ``calls`` runs of ``call()`` (which must wait for the device: warm, already
    compiled) and returns :func:`summarise` of their kernels, with ``wall_us_per_call``."""
    import time

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory(prefix="fwjax-profile-") as log_dir:
        with jax.profiler.trace(log_dir):
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            wall = time.perf_counter() - t0
        (path,) = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
        space = ProfileData.from_file(path)
        kernels = [(name, ns, 1) for name, ns in xspace_kernels(space)]
        if jax.default_backend() == "gpu" and not space.find_plane_with_name("/device:GPU:0"):
            raise RuntimeError("the profile has no /device:GPU:0 plane (CUPTI unavailable?)")
    if not kernels:
        raise RuntimeError("the profile holds no kernel events")
    return {**summarise(kernels, calls, top), "wall_us_per_call": wall / calls * 1e6}


def torch_kernel_times(call: Callable[[], object], calls: int = 3, top: int = 12) -> dict:
    """:func:`jax_kernel_times` for PyTorch: the CUDA kernels of ``calls`` runs of ``call()``
    (which synchronises), each with its self device time."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - t0
    kernels = []
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue  # kernels and copies only
        us = getattr(event, "self_device_time_total", None)
        if us is None:  # PyTorch before 2.4
            us = event.self_cuda_time_total
        kernels.append((event.key, us * 1e3, event.count))
    if not kernels:
        raise RuntimeError("the profile holds no CUDA kernel events")
    return {**summarise(kernels, calls, top), "wall_us_per_call": wall / calls * 1e6}


def format_profile(profile: dict, indent: str = "     ") -> str:
    """The profile as text lines: device and wall time per call, then one line per kernel."""
    lines = [
        f"{indent}device {profile['device_us_per_call']:.0f} us/call of "
        f"{profile['wall_us_per_call']:.0f} us wall"
    ]
    for k in profile["kernels"]:
        lines.append(
            f"{indent}{k['us_per_call']:9.1f} us {100 * k['share']:5.1f} %  "
            f"x{k['launches_per_call']:g}  {k['name'][:90]}"
        )
    if profile["other_us_per_call"]:
        lines.append(f"{indent}{profile['other_us_per_call']:9.1f} us  (other kernels)")
    return "\n".join(lines)
