#!/usr/bin/env python
"""Plain VQ vs SimVQ on speech-like waveforms: codebook collapse, end to end.

A small 1-D convolutional VQ autoencoder (16 kHz waveform windows of 1024 samples ->
128 latents of width 32 -> 1024 samples) is trained on synthetic speech-like audio,
once per (codebook size, quantiser), with the same encoder/decoder initialisation, seed,
batch order, optimiser and number of steps. No dataset can be downloaded here, so the
audio is generated deterministically by a source-filter synthesiser
(``simvq_kernels.experiments.data.synth_speech``); held-out utterances use a different
seed (new random speakers and syllables). Writes results.{md,csv,json} and PNG figures
to --out.

    python python/train_audio.py                        # the default run (~12 min, 2 cores)
    python python/train_audio.py --steps 8000 --codebook-sizes 1k,8k,64k
    python python/train_audio.py --quick --out /tmp/q   # CI-sized (seconds)
"""
import os
import time

import torch

from simvq_kernels.experiments import data, plots, report, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {"steps": 3000, "batch_size": 16, "lr": 2e-3, "codebook_sizes": [1024, 8192, 65536],
            "out": os.path.join(HERE, "results", "audio")}
SECONDS = data.UTTERANCE_SECONDS  # per synthetic utterance


def main(argv=None):
    p = train.common_parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--window", type=int, default=1024, help="samples per training item")
    p.add_argument("--n-down", type=int, default=3, help="downsampling 2**n (hop)")
    p.add_argument("--train-utterances", type=int, default=192,
                   help=f"synthetic training utterances of {SECONDS:g} s")
    p.add_argument("--min-heldout-utterances", type=int, default=64,
                   help="held-out utterances at least (more when the largest K needs them)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 30, 8
        args.codebook_sizes = [64, 256]
        args.train_utterances = 4
        args.window = 512
        args.min_heldout_utterances = 2
    t_start = time.perf_counter()
    cfg = train.config_from_args(args)
    torch.set_num_threads(args.threads)

    hop = 2 ** args.n_down
    tokens = args.window // hop
    need = args.heldout_tokens_per_code * max(args.codebook_sizes)
    n_held_utt = max(args.min_heldout_utterances,
                     data.utterances_for_tokens(need, SECONDS, hop, args.window))
    t0 = time.perf_counter()
    train_audio = data.synth_speech(args.train_utterances, SECONDS, seed=data.AUDIO_TRAIN_SEED)
    held_audio = data.synth_speech(n_held_utt, SECONDS, seed=data.AUDIO_HELDOUT_SEED)
    synth_s = time.perf_counter() - t0
    src = data.WaveSource(train_audio, window=args.window)
    heldout = data.WaveSource.windows(held_audio, args.window)
    # figure examples: loud held-out windows (the first ones are leading silence)
    energy = heldout.pow(2).mean(dim=(1, 2))
    order = torch.argsort(energy, descending=True)
    examples = heldout[order[len(order) // 10:len(order) // 10 + 4]]
    task = train.Task(
        name="audio", in_ch=1, nd=1, n_down=args.n_down, dim=args.dim, hidden=args.hidden,
        tokens_per_item=tokens, train_batch=src.train_batch, heldout=heldout,
        recon_metric="snr", examples=examples,
        notes={"source": "synthetic speech-like audio (simvq_kernels.experiments.data."
                         "synth_speech), train seed 0, held-out seed 1",
               "sample_rate": data.SAMPLE_RATE, "utterance_seconds": SECONDS,
               "train_seconds_of_audio":
                   args.train_utterances * SECONDS, "heldout_seconds_of_audio":
                   n_held_utt * SECONDS, "window": args.window, "hop": hop,
               "synthesis_seconds": synth_s})
    print(f"audio: {args.train_utterances * SECONDS:.0f} s training / "
          f"{n_held_utt * SECONDS:.0f} s held-out synthetic speech (synthesised in "
          f"{synth_s:.0f} s), {args.window}-sample windows, hop {hop} -> {tokens} tokens/"
          f"window, held-out {heldout.shape[0] * tokens} tokens; K = "
          f"{args.codebook_sizes}; {cfg.steps} steps x {cfg.batch_size}", flush=True)

    results, paths, total = report.sweep_and_report(task, cfg, args, argv, t_start,
                                                    "windows")
    plots.plot_audio_examples(examples[:1], results, os.path.join(args.out,
                              "recon_examples.png"), data.SAMPLE_RATE,
                              title="a held-out window and its reconstructions")
    print(open(paths["md"]).read())
    print(f"total {total / 60:.1f} min; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
