"""BatchTopK's inference form on a capture (issue 18, defect 3): the old "top k per row, then the running-average
threshold" against JumpReLU at the threshold calibrated on the final weights, scored on the same held-out tokens.

    python benchmarks/batchtopk_inference.py STORE OUT [EPOCHS]

STORE: a per-location capture with mid_block and up_blocks.0 at t=25 (the demo's `runs/demo/store`).
Writes OUT/btk.json and prints one line per slice.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from diffdissect.sae import TrainConfig, evaluate, load_sae, train_sae
from diffdissect.sae.data import SliceData
from diffdissect.sae.model import Codes
from diffdissect.store import open_store


class _TopKThenThreshold:
    """The inference the code used before: each row's top k, then the running-average threshold."""

    def __init__(self, sae, threshold: float):
        self.sae, self.config, self.threshold, self.training = sae, sae.config, threshold, False
        self.W_dec = sae.W_dec

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def encode(self, x):
        pre = (x * self.sae.input_scale - self.sae.b_dec) @ self.sae.W_enc.t() + self.sae.b_enc
        values, indices = pre.topk(self.config.k, dim=-1)
        return Codes(torch.relu(values * (values > self.threshold)), indices), None

    def decode(self, codes):
        return self.sae.decode(codes)


def main(store: str, out: str, epochs: float = 10.0) -> dict:
    results = {}
    for layer, t in [("mid_block", 25), ("up_blocks.0", 25)]:
        config = TrainConfig(layer=layer, t=t, tokens=True, k=16, expansion=8, epochs=epochs, batch_size=1024,
                             variant="batchtopk")
        began = time.perf_counter()
        summary = train_sae(store, config, Path(out) / config.run_name(), progress=False)
        sae, info = load_sae(Path(out) / config.run_name())
        heldout = SliceData(open_store(store), layer, t, True, 0.1).heldout()
        new = evaluate(sae, heldout)
        with torch.no_grad():
            old = evaluate(_TopKThenThreshold(sae, info["inference"]["threshold_running_average"]), heldout)
        results[f"{layer}@{t}"] = {
            "jumprelu": {"fvu": new["fvu"], "l0": new["l0"], "threshold": info["inference"]["threshold"]},
            "topk_then_threshold": {"fvu": old["fvu"], "l0": old["l0"],
                                    "threshold": info["inference"]["threshold_running_average"]},
            "last_batch": summary["last_batch"], "seconds": round(time.perf_counter() - began, 1)}
        print(layer, t, json.dumps(results[f"{layer}@{t}"]), flush=True)
    (Path(out) / "btk.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 10.0)
