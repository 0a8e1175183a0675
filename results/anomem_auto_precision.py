"""AnoMem whole fit, precision="auto" (bf16 stage 1 on AMX CPUs) vs "fp32": ResNet-18 full width, 32 px,
batch 256, 512 random images, 1 epoch, twice interleaved. Run: python results/anomem_auto_precision.py"""
import time, os, torch, json
from pyanomaly import AnoMem
imgs = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
cfg = dict(backbone="resnet18", image_size=32, batch_size=256, epochs=1, seed=0, verbose=False, device="cpu")
rows = []
for rep in range(2):
    for prec in ("auto", "fp32"):
        load = os.getloadavg()[0]; t = time.perf_counter()
        det = AnoMem(**cfg, precision=prec).fit(imgs)
        rows.append(dict(precision=prec, train_precision=det.train_precision_, fit_s=round(time.perf_counter() - t, 1),
                         loss=round(det.history_[0]["loss"], 4), load_before=round(load, 2)))
        print(rows[-1], flush=True)
