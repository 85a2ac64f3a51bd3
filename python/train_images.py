#!/usr/bin/env python
"""Plain VQ vs SimVQ on natural-image crops: codebook collapse, end to end.

A small convolutional VQ autoencoder (32x32 RGB crops -> 8x8 latents of width 32 ->
32x32) is trained on random crops of the images bundled with scikit-image, once per
(codebook size, quantiser), with the same encoder/decoder initialisation, seed, batch
order, optimiser and number of steps. Held-out crops come from a strip of every image
that no training crop touches. Writes results.{md,csv,json} and PNG figures to --out.

    python python/train_images.py                       # the default run (~12 min, 2 cores)
    python python/train_images.py --steps 6000 --codebook-sizes 1k,4k,16k,64k
    python python/train_images.py --quick --out /tmp/q  # CI-sized (seconds)
"""
import os
import time

import torch

from simvq_kernels.experiments import data, plots, report, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {"steps": 2500, "batch_size": 32, "lr": 2e-3, "codebook_sizes": [1024, 8192, 65536],
            "out": os.path.join(HERE, "results", "images")}


def main(argv=None):
    p = train.common_parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--crop", type=int, default=32, help="crop size (pixels)")
    p.add_argument("--n-down", type=int, default=2, help="downsampling 2**n per axis")
    p.add_argument("--min-heldout-crops", type=int, default=1024,
                   help="held-out crops at least (more when the largest K needs them)")
    args = p.parse_args(argv)
    names = data.DEFAULT_IMAGES
    if args.quick:
        args.steps, args.batch_size = 30, 16
        args.codebook_sizes = [64, 256]
        args.heldout_tokens_per_code = 10
        args.min_heldout_crops = 64
        names = ("astronaut", "coffee", "camera")
    t_start = time.perf_counter()
    cfg = train.config_from_args(args)
    torch.set_num_threads(args.threads)

    src = data.CropSource(data.load_skimage_images(names), crop=args.crop)
    side = args.crop // 2 ** args.n_down
    tokens = side * side
    n_held = train.heldout_items(args.heldout_tokens_per_code, args.codebook_sizes, tokens,
                                 minimum=args.min_heldout_crops)
    heldout = src.heldout_set(n_held, seed=12345)
    task = train.Task(
        name="images", in_ch=3, nd=2, n_down=args.n_down, dim=args.dim, hidden=args.hidden,
        tokens_per_item=tokens, train_batch=src.train_batch, heldout=heldout,
        recon_metric="psnr", examples=heldout[:8],
        notes={"images": list(names), "crop": args.crop, "heldout_strip": "right 25%",
               "source": "skimage.data (bundled with scikit-image, no download)"})
    print(f"images: {len(names)} skimage.data images, {args.crop}px crops, "
          f"{tokens} tokens/crop, held-out {n_held} crops = {n_held * tokens} tokens; "
          f"K = {args.codebook_sizes}; {cfg.steps} steps x {cfg.batch_size}", flush=True)

    results, paths, total = report.sweep_and_report(task, cfg, args, argv, t_start, "crops")
    plots.plot_recon_grid(heldout[:8], results, os.path.join(args.out, "recon_grid.png"),
                          title="held-out crops and their reconstructions")
    print(open(paths["md"]).read())
    print(f"total {total / 60:.1f} min; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
