"""CPU benchmark driver: every framework and configuration in its own subprocess, one table.

    python -m benchmarks.run                      # the full grid (resumable; see --out)
    python -m benchmarks.run --quick              # a smoke test of every code path, small shapes
    python -m benchmarks.run --sweep              # chunk-size sweep of fwjax CHUNKED
    python -m benchmarks.run --table-only         # print the table of an existing results file

Grid: d=64, (B, H) in {(1, 4), (8, 8)}, T in {256, 1024, 4096, 8192}, fwd and fwd+bwd (the
gradient of ⟨o, do⟩ w.r.t. q, k, v, β). Results are appended to a JSONL file as each
configuration finishes; finished configurations are skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from benchmarks import common

NAIVE_LIMIT_BYTES = 6e9  # skip autodiff-through-the-scan runs whose stored states exceed this

JAX_IMPLS = ("fwjax_auto", "fwjax_recurrent", "fwjax_chunked", "fwjax_naive")
TORCH_IMPLS = ("torch_recurrent", "torch_chunked")
# Chunk sizes: fwjax CHUNKED at its CPU default (32, chosen by the --sweep); torch's chunked
# form at both usual sizes.
CHUNKS = {"fwjax_chunked": (32,), "torch_chunked": (32, 64)}


def grid(quick: bool, with_torch: bool, shapes=None, modes=("fwd", "fwdbwd"), repeats=3):
    if shapes is None:
        full = [(b, h, t) for (b, h) in ((1, 4), (8, 8)) for t in (256, 1024, 4096, 8192)]
        shapes = [(1, 2, 40)] if quick else full
    impls = JAX_IMPLS + (TORCH_IMPLS if with_torch else ())
    for b, h, t in shapes:
        for mode in modes:
            for impl in impls:
                for chunk in CHUNKS.get(impl, (0,)):
                    yield common.Config(impl, b, h, t, mode, chunk, 1 if quick else repeats)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``B,H,T`` -> (B, H, T)."""
    b, h, t = (int(x) for x in text.split(","))
    return b, h, t


def sweep_grid():
    for b, h, t in ((8, 8, 4096), (1, 4, 4096)):
        for mode in ("fwd", "fwdbwd"):
            for chunk in (8, 16, 32, 64, 128):
                yield common.Config("fwjax_chunked", b, h, t, mode, chunk)
            yield common.Config("fwjax_recurrent", b, h, t, mode)


def skip_reason(cfg: common.Config) -> str | None:
    stores_states = cfg.impl in ("fwjax_naive", "torch_recurrent") and cfg.mode == "fwdbwd"
    if stores_states and common.naive_state_bytes(cfg) > NAIVE_LIMIT_BYTES:
        return f"would store {common.naive_state_bytes(cfg) / 1e9:.1f} GB of states"
    return None


def run_worker(module: str, arg: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", module, arg],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt_table(records: list[dict]) -> str:
    head = (
        f"| {'impl':16} | {'C':>3} | {'B':>1} | {'H':>1} | {'T':>5} | {'mode':6} | "
        f"{'tokens/s':>10} | {'model GF/s':>10} | {'alg GF/s':>8} | {'eff %':>5} | "
        f"{'peak MB':>8} | {'peak/io':>7} | {'max rel err':>11} |"
    )
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    key = lambda r: (r["b"], r["h"], r["mode"], r["t"], r["impl"], r["chunk"])
    for r in sorted(records, key=key):
        cfg = common.Config(r["impl"], r["b"], r["h"], r["t"], r["mode"], r["chunk"])
        prefix = (
            f"| {cfg.impl:16} | {cfg.chunk or '':>3} | {cfg.b:>1} | {cfg.h:>1} | "
            f"{cfg.t:>5} | {cfg.mode:6} |"
        )
        if "seconds" not in r:
            lines.append(f"{prefix} {r.get('skipped') or r.get('error', '?')} |")
            continue
        s = r["seconds"]
        model = common.model_flops(cfg) / s / 1e9
        alg = common.algorithm_flops(cfg) / s / 1e9
        io = common.io_bytes(cfg)
        lines.append(
            f"{prefix} {cfg.b * cfg.t / s:>10.0f} | {model:>10.1f} | {alg:>8.1f} | "
            f"{100 * model / r['matmul_gflops']:>5.1f} | {r['peak_bytes'] / 2**20:>8.0f} | "
            f"{r['peak_bytes'] / io:>7.2f} | {r['max_rel_err']:>11.1e} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    parser.add_argument("--sweep", action="store_true", help="chunk-size sweep instead of grid")
    parser.add_argument("--out", default=None, help="JSONL results file (resumable)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=None,
        help="only these B,H,T shapes (e.g. 8,8,256)",
    )
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    args = parser.parse_args(argv)
    default_name = "quick" if args.quick else ("sweep" if args.sweep else "grid")
    out = args.out or os.path.join("benchmarks", "results", f"{default_name}.jsonl")
    if args.table_only:
        print(fmt_table(load(out)))
        return 0
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    if not with_torch:
        print("torch not installed (pip install -e '.[bench]'): PyTorch baselines skipped")
    done = {
        common.Config(r["impl"], r["b"], r["h"], r["t"], r["mode"], r["chunk"]).key
        for r in load(out)
    }
    matmul = run_worker("benchmarks.jax_worker", "matmul", args.timeout)["matmul_gflops"]
    print(f"in-run 2048^3 fp32 matmul (XLA): {matmul:.1f} GFLOP/s")
    configs = list(
        sweep_grid()
        if args.sweep
        else grid(args.quick, with_torch, args.shapes, tuple(args.modes), args.repeats)
    )
    failures = 0
    for cfg in configs:
        if cfg.key in done:
            continue
        record = {**json.loads(cfg.to_json()), "matmul_gflops": matmul, "time": time.time()}
        reason = skip_reason(cfg)
        if reason:
            record["skipped"] = reason
        else:
            module = (
                "benchmarks.torch_worker"
                if cfg.impl.startswith("torch")
                else ("benchmarks.jax_worker")
            )
            try:
                record.update(run_worker(module, cfg.to_json(), args.timeout))
            except subprocess.TimeoutExpired:
                record["error"] = f"timeout after {args.timeout:.0f} s"
        failures += "error" in record
        print(
            f"{cfg.key}: "
            + (
                f"{record['seconds']:.4f} s"
                if "seconds" in record
                else record.get("skipped") or record.get("error")
            ),
            flush=True,
        )
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(fmt_table(load(out)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
