"""Each step of ResNet-50's native chain on ``cpu-sparse``, timed by the vCPUs' placement.

``cpu-sparse`` runs ResNet-50 ``magnitude:0.9`` (batch 1, 2 threads) as a dense stem and one
native chain of 60-70 steps (layout copies, products, the head). This script converts the
model as the target does, then for ``--seconds`` repeats: probe the cache-line round trip
between CPUs 0 and 1 (``sparse_kernels.round_trip``: 50-120 ns where the host keeps the two
vCPUs on one CCX, 330-440 ns across two CCDs on the Zen 4 VM), run the whole model four times
and the chain's steps one by one in order on the chain's input of the last run (each step's
native call timed from Python, so a few microseconds each above its share of the one-call
chain). It prints the whole model's
median and each step's median near and far, and the difference: where the far placement
costs.

    python benchmarks/chain_steps.py [--seconds 90] [--threads 2] [--spec magnitude:0.9]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from sparse_kernels import round_trip

from benchlib.loading import load_model
from benchlib.pruning import prune
from benchlib.sparse.binding import COPY_STEP, GATHER_STEP, LINEAR_STEP, POOL_STEP
from benchlib.sparse.chain import NativeChain
from targets.cpu_sparse import CpuSparse

KINDS = {GATHER_STEP: "product", COPY_STEP: "copy", POOL_STEP: "pool", LINEAR_STEP: "linear"}
FAR_NS = 250
"""Round trips above this many nanoseconds count as the far placement."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spec", default="magnitude:0.9")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("resnet50")
    variant = prune(model, args.spec)
    x = model.example_input(1)
    # the target's conversion (fusions, sparse layers kept where faster, chains bound)
    converted, _, _ = CpuSparse()._convert(copy.deepcopy(variant.module).eval(), (x,))
    [chain] = [m for m in converted.modules() if isinstance(m, NativeChain)]
    held: list[torch.Tensor] = []  # the chain's input, kept: its steps point into it
    hook = chain.register_forward_pre_hook(lambda _, inputs: held.append(inputs[0]))
    with torch.inference_mode():
        for _ in range(3):
            converted(x)
    hook.remove()
    chain_input = held[-1].contiguous()
    [binding] = chain._bindings.values()
    steps: dict[str, list[list[int]]] = {"near": [], "far": []}
    whole: dict[str, list[int]] = {"near": [], "far": []}
    end = time.monotonic() + args.seconds
    with torch.inference_mode():
        while time.monotonic() < end:
            probe = round_trip()
            if not probe.endswith(" ns"):
                raise SystemExit(f"no round trip here: {probe}")
            placement = "far" if float(probe.split()[0]) > FAR_NS else "near"
            for _ in range(4):
                begin = time.perf_counter_ns()
                converted(x)
                whole[placement].append(time.perf_counter_ns() - begin)
                out = binding.run(chain_input)  # the steps' addresses: tensors held here
                times = []
                for _, call in binding.calls:
                    begin = time.perf_counter_ns()
                    call()
                    times.append(time.perf_counter_ns() - begin)
                steps[placement].append(times)
                del out
    for placement, values in whole.items():
        if values:
            print(f"{placement}: {len(values)} runs, model median "
                  f"{statistics.median(values) / 1e6:.2f} ms")  # fmt: skip
    if not (steps["near"] and steps["far"]):
        print("only one placement met: no comparison")
        return
    near = [statistics.median(column) / 1e3 for column in zip(*steps["near"], strict=True)]
    far = [statistics.median(column) / 1e3 for column in zip(*steps["far"], strict=True)]
    print(f"steps one by one: near {sum(near) / 1e3:.2f} ms, far {sum(far) / 1e3:.2f} ms")
    print(f"{'step':>4} {'kind':8} {'near us':>8} {'far us':>8} {'far-near':>9}")
    for index, ((kind, _), a, b) in enumerate(zip(binding.calls, near, far, strict=True)):
        print(f"{index:4d} {KINDS.get(kind, str(kind)):8} {a:8.1f} {b:8.1f} {b - a:9.1f}")


if __name__ == "__main__":
    main()
