"""Training throughput of the 2.x lesion trainer's step, float32 against bfloat16 autocast
(``dicompipe train --bf16``), interleaved in one run: ResNet50 with layer4 dilated, 160 px,
batch 32, cross-entropy + location loss, AdamW. Images per second, median of repeats.

Run: ``python -m benchmarks.train_speed [--repeats 5] [--out FILE]``. The figure to compare
is the ratio measured in one run on one machine; bf16 pays off only on CPUs with
AVX512-BF16 or AMX (elsewhere oneDNN emulates it and ``--bf16`` is refused).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def step_fn(bf16: bool, size: int = 160, bs: int = 32, threads: int = 2):
    """One training step of the lesion trainer (same network, losses and optimiser) on
    random input; returns the step as a callable."""
    import torch
    import torch.nn.functional as F

    from dicompipe.model.network import cell_logits, forward_with_features, resnet50
    from dicompipe.train.pretrain import location_loss
    from dicompipe.train.train import autocast
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = resnet50(3, zero_init_residual=True, layer4_dilation=2).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.arange(bs) % 3
    masks = torch.zeros(bs, 1, size, size)
    masks[y > 0, :, size // 3:size // 2, size // 3:size // 2] = 1.0

    def step():
        with autocast(bf16):
            logits, feat = forward_with_features(net, x)
        logits, feat = logits.float(), feat.float()
        loss = F.cross_entropy(logits, y) + 3 * location_loss(cell_logits(net, feat), masks, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> dict:
    from benchmarks.common import RESULTS, interleaved, machine, write_json
    from dicompipe.train.train import native_bf16
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = ap.parse_args(argv)
    t = interleaved({"fp32": step_fn(False, args.size, args.batch), "bf16": step_fn(True, args.size, args.batch)},
                    repeats=args.repeats, warmup=2)
    rates = {k: v.rate(args.batch) for k, v in t.items()}
    res = {"machine": machine(), "native_bf16": native_bf16(), "batch": args.batch, "size": args.size,
           "img_per_s": {k: r.to_dict() for k, r in rates.items()},
           "bf16_speedup": round(rates["bf16"].median / rates["fp32"].median, 2),
           "timings": {k: v.to_dict() for k, v in t.items()}}
    print(f"fp32 {rates['fp32'].fmt(' img/s')}, bf16 {rates['bf16'].fmt(' img/s')}: "
          f"{res['bf16_speedup']}x (native bf16: {res['native_bf16']})")
    write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
