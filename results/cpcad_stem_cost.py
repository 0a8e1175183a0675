"""Training cost per epoch of CPC-AD's encoder choices on the ``cpu`` preset (issue 21 item 2).

Fits ``CPCAD.preset("cpu")`` on 16 random 128 px images with the fast or the GIM stem, shared or
four encoders, for 1 and for 3 epochs; seconds per epoch = (fit(3) - fit(1)) / 2, so setup and the
after-fit scoring pass cancel. Two repeats; prints one JSON line (thread count and load beside it).

Run: ``python results/cpcad_stem_cost.py`` (results/cpcad.md quotes one run).
"""

from __future__ import annotations

import json
import os
import time

import torch

from pyanomaly import CPCAD


def main() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 128, 128), dtype=torch.uint8)
    seconds: dict[str, list[float]] = {}
    for _ in range(2):
        for stem in ("fast", "gim"):
            for shared in (True, False):
                fits = []
                for epochs in (1, 3):
                    detector = CPCAD.preset("cpu", stem=stem, shared_encoder=shared, epochs=epochs, device="cpu",
                                            verbose=False, seed=0)
                    tick = time.perf_counter()
                    detector.fit(images)
                    fits.append(time.perf_counter() - tick)
                key = f"{stem}/{'shared' if shared else 'four'}"
                seconds.setdefault(key, []).append(round((fits[1] - fits[0]) / 2, 2))
    print(json.dumps({"s_per_epoch_16_images": seconds, "threads": torch.get_num_threads(),
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
