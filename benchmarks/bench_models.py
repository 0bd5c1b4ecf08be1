"""Forward-pass speed of the models: eager fp32 vs channels_last vs bf16 autocast vs onnxruntime.

Usage: python benchmarks/bench_models.py [--models cfcd_r50 gem_efficientnet_lite2] [--size 256] [--batch 2] [--reps 5]
All paths run in one process on the same inputs; the table reports images/s and the ratio to eager fp32,
plus the max abs / cosine difference of each path's descriptors against eager fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["cfcd_r50", "dolg_r50", "gem_efficientnet_lite2"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import cfcd.models as M
    from cfcd.models.export import export_onnx

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, input {args.batch}x3x{args.size}x{args.size}")
    print(f"{'model':<24} {'path':<16} {'img/s':>8} {'ratio':>6} {'max|d|':>9} {'min cos':>8}")
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        model = M.create(name, weights=None if M.has_embedded_weights(name) else "random")
        with torch.no_grad():
            ref = model(x)
            results = {}
            results["eager fp32"] = (timed(lambda: model(x), args.reps), ref)
            cl_model = M.create(name, weights=None if M.has_embedded_weights(name) else "random").to(memory_format=torch.channels_last)
            cl_model.load_state_dict(model.state_dict())
            xc = x.contiguous(memory_format=torch.channels_last)
            results["channels_last"] = (timed(lambda: cl_model(xc), args.reps), cl_model(xc))

            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return cl_model(xc)

            results["cl + bf16"] = (timed(bf16, args.reps), bf16())
        try:
            import onnxruntime as ort

            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(model, Path(tmp) / "m.onnx", size=(args.size, args.size), batch=args.batch)
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                feed = {session.get_inputs()[0].name: x.numpy()}
                out = torch.from_numpy(session.run(None, feed)[0])
                results["onnxruntime"] = (timed(lambda: session.run(None, feed), args.reps), out)
        except ImportError:
            pass
        base = results["eager fp32"][0]
        for path_name, (seconds, out) in results.items():
            diff = float((out.float() - ref).abs().max())
            cos = float(F.cosine_similarity(out.float(), ref).min())
            print(f"{name:<24} {path_name:<16} {args.batch / seconds:8.2f} {base / seconds:6.2f} {diff:9.2e} {cos:8.5f}")


if __name__ == "__main__":
    main()
