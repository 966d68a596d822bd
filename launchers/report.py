"""Summarise a finished run of the launchers from its workdir: throughput (images/s per
device and in total, without the first logged interval, which holds start-up and
compilation) and, for full runs, the final evaluation.

    python launchers/report.py --workdir=runs/vit_b32-performance-8p-... --devices=8
"""
import argparse
import json
import math
import os
import sys


def report(workdir: str, devices: int, mode: str = "performance") -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "train/img_s_per_device" in r]
    if not train:
        raise SystemExit(f"{workdir}/metrics.jsonl has no training rows (did the run resume "
                         f"from a finished checkpoint?)")
    steady = train[1:] or train
    per_device = sum(r["train/img_s_per_device"] for r in steady) / len(steady)
    out = {"devices": devices, "img_s_per_device": per_device, "img_s_total": per_device * devices,
           "steps": train[-1]["step"], "final_loss": train[-1].get("train/loss", math.nan)}
    print(f"performance: {per_device:.1f} images/s per device, {per_device * devices:.1f} images/s "
          f"on {devices} device(s) (steps {steady[0]['step']}..{train[-1]['step']}, "
          f"first interval of {train[0]['step']} step(s) left out)")
    print(f"final loss: {out['final_loss']:.4f}")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals and mode == "full":
        last = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}
        out["eval"] = last
        print("final evaluation at step %d: %s" % (evals[-1]["step"], ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(last.items()))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--devices", type=int, required=True, help="number of devices that trained")
    p.add_argument("--mode", default="performance", choices=("performance", "full"))
    a = p.parse_args(argv)
    out = report(a.workdir, a.devices, a.mode)
    with open(os.path.join(a.workdir, f"report_{a.mode}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
