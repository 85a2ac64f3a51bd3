#!/usr/bin/env python
"""Held-out utilisation of a trained demo model as a curve over tokens per code.

Loads a model saved by ``train_images.py`` or ``train_audio.py --save-models DIR`` and
encodes a stream of held-out items until it holds the largest number of tokens per code
asked for: for images, random crops of the held-out strip of every image (the right
25%, as in the demo), seed ``--seed``; for audio, the windows of the demo's held-out
utterances, synthesised from the held-out seed stream (``--seed``, default 1, as in the
demo; the training utterances use seed 0, which is refused here), utterance after
utterance, so the first 10 tokens per code are the demo's own held-out set. The task
comes from the checkpoint (``--task`` checks it). The nearest-code search is
``simvq_kernels.nearest_code`` (the fused CPU kernel). Reports, for each prefix of the
stream, the utilisation, the perplexity and the fraction of codes that independent
draws from the largest set's histogram are expected to pick
(:mod:`simvq_kernels.experiments.curve`). Results are rewritten after every point, so a
run cut short keeps the points it reached. With ``--state FILE`` the run also keeps its
progress there (the indices found so far and the fitted k-means centres, every
``--state-every`` minutes and at every point): run the same command again and it goes on
from there, and ``--stop-after-minutes`` ends a run with its state saved, so a search that
takes hours can be split over several sittings with the same result.

With ``--kmeans-iters N`` it also runs k-means with the same K on the model's training
latents (``--kmeans-tokens-per-code`` latents per code from training crops or training
windows at random positions, initialised
from random latents, assignments by ``simvq_kernels.nearest_code``) and evaluates its
codebook on the same held-out latents in the same pass: how many codes this data can
keep in use with a codebook fitted to it (the data's capacity at this K).

    python python/train_images.py --quantisers simvq --codebook-sizes 64k --threads 1 \\
        --cpu-budget 12 --save-models ~/.cache/simvq-demos
    python python/heldout_curve.py --checkpoint ~/.cache/simvq-demos/images_simvq_65536.pt \\
        --tokens-per-code 10,30,100,200 --out python/results/images/tokens_per_code
    python python/train_audio.py --quantisers simvq --codebook-sizes 64k --threads 1 \\
        --steps 1000000 --cpu-budget 8 --save-models ~/.cache/simvq-demos
    python python/heldout_curve.py --checkpoint ~/.cache/simvq-demos/audio_simvq_65536.pt \\
        --tokens-per-code 10,30,100,200 --out python/results/audio/tokens_per_code
"""
import argparse
import csv
import json
import os
import sys
import time

import torch

import simvq_kernels as sk
from simvq_kernels.experiments import curve, data, models, train


def load_model(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    m = ck["model"]
    model = models.build_autoencoder(ck["kind"], ck["codebook_size"], in_ch=m["in_ch"],
                                     dim=m["dim"], hidden=m["hidden"], n_down=m["n_down"],
                                     nd=m["nd"], seed=ck["config"]["seed"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck


@torch.no_grad()
def latents(model, items):
    z = model.encoder(items)  # (B, d, h, w) or (B, d, t)
    return z.movedim(1, -1).reshape(-1, z.shape[1]).contiguous()


class Source:
    """What the curve needs from a task: tokens per item, the held-out items in
    batches (a fixed stream, so that a prefix of it is a smaller held-out set), training
    items for k-means, and what to say about them."""

    def __init__(self, per_item, heldout_batches, train_batch, meta, describe):
        self.per_item = per_item
        self.heldout_batches = heldout_batches  # (n_items, chunk) -> iterator of batches
        self.train_batch = train_batch  # (generator, n) -> batch of training items
        self.meta = meta  # stored in curve.json
        self.describe = describe  # a sentence on the held-out stream


def image_source(ck, args):
    notes = ck.get("task_notes", {})
    names = (args.images.split(",") if args.images
             else notes.get("images", list(data.DEFAULT_IMAGES)))
    crop = notes.get("crop", 32)
    src = data.CropSource(data.load_skimage_images(names), crop=crop)
    seed = 2024 if args.seed is None else args.seed

    def heldout_batches(n_items, chunk):
        gen = torch.Generator().manual_seed(seed)
        for i in range(0, n_items, chunk):
            yield src._crops(gen, min(chunk, n_items - i), heldout=True)

    return Source((crop // 2 ** ck["model"]["n_down"]) ** 2, heldout_batches,
                  src.train_batch, {"images": names, "crop": crop, "stream_seed": seed},
                  f"random {crop}px crops of the held-out strips of {len(names)} skimage "
                  f"images, seed {seed}")


def audio_source(ck, args, log=print):
    notes = ck.get("task_notes", {})
    window, hop = notes.get("window", 1024), notes.get("hop", 8)
    seconds = notes.get("utterance_seconds", data.UTTERANCE_SECONDS)
    seed = data.AUDIO_HELDOUT_SEED if args.seed is None else args.seed
    if seed == data.AUDIO_TRAIN_SEED:
        raise SystemExit(f"seed {seed} made the training utterances: held-out audio "
                         f"needs another seed")
    per_utt = int(round(seconds * data.SAMPLE_RATE)) // window

    def heldout_batches(n_items, chunk):
        # utterance i of a seed is the same whatever the count (numpy fills the noise
        # floor in order), so this stream starts with the demo's own held-out set
        n_utt = -(-n_items // per_utt)
        t0 = time.perf_counter()
        wins = data.WaveSource.windows(data.synth_speech(n_utt, seconds, seed=seed), window)
        log(f"synthesised {n_utt:,} held-out utterances ({n_utt * seconds / 3600:.2f} h) "
            f"in {time.perf_counter() - t0:.0f} s", flush=True)
        for i in range(0, n_items, chunk):
            yield wins[i:min(n_items, i + chunk)]

    def train_batch(gen, n):
        if "train" not in cache:
            n_utt = int(round(notes.get("train_seconds_of_audio", 384.0) / seconds))
            cache["train"] = data.WaveSource(
                data.synth_speech(n_utt, seconds, seed=data.AUDIO_TRAIN_SEED), window=window)
        return cache["train"].train_batch(gen, n)

    cache = {}
    return Source(window // hop, heldout_batches, train_batch,
                  {"window": window, "hop": hop, "utterance_seconds": seconds,
                   "stream_seed": seed},
                  f"the {window}-sample windows of synthetic utterances of {seconds:g} s "
                  f"(simvq_kernels.experiments.data.synth_speech, held-out seed {seed}: new "
                  f"random speakers and syllables), in order")


SOURCES = {"images": image_source, "audio": audio_source}


@torch.no_grad()
def kmeans(x, k, iters, seed, backend, log=print):
    """Lloyd's k-means on rows of x, initialised from k distinct random rows; an empty
    cluster keeps its centre. Returns (centres, per-iteration history)."""
    gen = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    hist = []
    for it in range(iters):
        t0 = time.process_time()
        idx, dist = sk.nearest_code(x, c, backend=backend)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(c, dtype=torch.float64).index_add_(0, idx, x.double())
        live = counts > 0
        c[live] = (sums[live] / counts[live, None]).to(c.dtype)
        hist.append({"iteration": it + 1, "mse": float(dist.double().mean()) / x.shape[1],
                     "used": int(live.sum()), "cpu_seconds": time.process_time() - t0})
        log(f"  k-means {it + 1}/{iters}: {hist[-1]['used']}/{k} clusters non-empty, "
            f"per-dim MSE {hist[-1]['mse']:.5f}, {hist[-1]['cpu_seconds']:.0f} CPU-s")
    return c, hist


def state_key(args):
    """What fixes the held-out stream, the codebooks and the indices: a state saved under
    other values belongs to another run."""
    return {"checkpoint": os.path.abspath(args.checkpoint),
            "tokens_per_code": args.tokens_per_code, "seed": args.seed, "chunk": args.chunk,
            "kmeans_iters": args.kmeans_iters,
            "kmeans_tokens_per_code": args.kmeans_tokens_per_code,
            "kmeans_only": args.kmeans_only, "backend": args.backend, "images": args.images}


def load_state(path, key):
    """The state saved by an earlier run of the same command, or None if there is none."""
    if not os.path.exists(path):
        return None
    st = torch.load(path, map_location="cpu", weights_only=False)
    diff = [f"{k}: {st['key'].get(k)!r} there, {v!r} here" for k, v in key.items()
            if st["key"].get(k) != v]
    if diff:
        raise SystemExit(f"--state {path} was saved by another run ({'; '.join(diff)}): "
                         f"give another --state file, or delete this one to start over")
    return st


def save_state(path, st):
    tmp = path + ".tmp"
    torch.save(st, tmp)
    os.replace(tmp, path)


def write(out, payload):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(payload, f, indent=1)
    cols = ["codebook", "tokens", "tokens_per_code", "used", "utilisation", "perplexity",
            "expected_seen"]
    with open(os.path.join(out, "curve.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, cv in payload["curves"].items():
            for p in cv["points"]:
                w.writerow([name] + [p[c] for c in cols[1:]])
    lines = [f"# Held-out utilisation over tokens per code ({payload.get('task', 'images')}, "
             f"K = {payload['codebook_size']})",
             "", payload["description"], "",
             "| codebook | tokens per code | held-out tokens | codes used | utilisation "
             "| expected if sampled from the largest set's histogram | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cv in payload["curves"].items():
        for p in cv["points"]:
            lines.append(f"| {name} | {p['tokens_per_code']:g} | {p['tokens']:,} | "
                         f"{p['used']:,} | {train.format_percent(p['utilisation'])} | "
                         f"{train.format_percent(p['expected_seen'])} | "
                         f"{p['perplexity']:,.0f} |")
    lines += ["", "Largest set: Good-Turing estimate of the probability mass of the codes "
              "it never picked (singletons / tokens), and Chao1's estimate of the codes in "
              "use (used + f1^2 / 2 f2):", "",
              "| codebook | tokens per code | codes used | singletons | unseen mass "
              "(Good-Turing) | Chao1 codes | Chao1 utilisation |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cv in payload["curves"].items():
        f_ = cv["full"]
        lines.append(f"| {name} | {f_['tokens_per_code']:g} | {f_['used']:,} | "
                     f"{f_['singletons']:,} | {f_['good_turing_unseen_mass']:.2e} | "
                     f"{f_['chao1_codes']:,.0f} | "
                     f"{train.format_percent(f_['chao1_utilisation'])} |")
    with open(os.path.join(out, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(out, payload):
    from simvq_kernels.experiments.plots import _plt, _finish
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colours = {"SimVQ": "#1f77b4", "k-means": "#8c564b"}
    for name, cv in payload["curves"].items():
        pts = cv["points"]
        x = [p["tokens_per_code"] for p in pts]
        col = colours.get(name.split(" ")[0])
        ax.plot(x, [100 * p["utilisation"] for p in pts], "o-", color=col,
                label=f"{name}: observed")
        ax.plot(x, [100 * p["expected_seen"] for p in pts], "x--", color=col,
                label=f"{name}: expected from the largest set's histogram")
        for xi, p in zip(x, pts):
            ax.annotate(train.format_percent(p["utilisation"]), (xi, 100 * p["utilisation"]),
                        textcoords="offset points", xytext=(0, -12), ha="center",
                        fontsize=7, color=col)
    ax.set_xscale("log")
    ax.set_xlabel("held-out tokens per code")
    ax.set_ylabel("codes picked at least once (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _finish(plt, fig, os.path.join(out, "utilisation_vs_tokens_per_code.png"),
            f"{payload.get('task', 'images')}, K = {payload['codebook_size']}: held-out "
            f"utilisation vs held-out size",
            fontsize=9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="from train_images.py or train_audio.py --save-models")
    p.add_argument("--task", choices=sorted(SOURCES), default=None,
                   help="the checkpoint's task (default: read from the checkpoint)")
    p.add_argument("--tokens-per-code", default="10,30,100,200",
                   help="comma-separated points of the curve")
    p.add_argument("--seed", type=int, default=None,
                   help="held-out stream (default: 2024 for images; for audio 1, the "
                        "demo's held-out utterances)")
    p.add_argument("--chunk", type=int, default=1024,
                   help="crops or windows per encoder batch")
    p.add_argument("--kmeans-iters", type=int, default=0,
                   help="also fit k-means with the same K (0: no)")
    p.add_argument("--kmeans-tokens-per-code", type=float, default=10.0,
                   help="training latents for k-means, per code")
    p.add_argument("--kmeans-only", action="store_true",
                   help="evaluate the k-means codebook alone (the model's curve was made "
                        "by an earlier run; halves the search cost)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="cpu", help="nearest_code backend")
    p.add_argument("--images", default=None,
                   help="images: comma-separated skimage.data names (default: the "
                        "checkpoint's)")
    p.add_argument("--out", required=True)
    p.add_argument("--state", default=None,
                   help="file to keep the run's progress in (indices found so far, k-means "
                        "centres) and to resume from when it exists")
    p.add_argument("--state-every", type=float, default=10.0,
                   help="minutes between saves of --state (it is also saved at every point)")
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="with --state: save the state and stop after this many minutes of "
                        "wall clock; run the command again to go on")
    p.add_argument("--stop-after-tokens", type=int, default=None,
                   help="with --state: save the state and stop once this many held-out tokens "
                        "are searched (counted over all sittings)")
    args = p.parse_args(argv)
    if (args.stop_after_minutes is not None or args.stop_after_tokens is not None) \
            and args.state is None:
        raise SystemExit("--stop-after-minutes and --stop-after-tokens need --state (the "
                         "run would stop with its work lost)")
    if args.state_every <= 0:
        raise SystemExit(f"--state-every must be > 0 minutes, got {args.state_every}")
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()

    model, ck = load_model(args.checkpoint)
    k = ck["codebook_size"]
    task = ck.get("task", "images")
    if args.task is not None and args.task != task:
        raise SystemExit(f"--task {args.task}, but the checkpoint is a {task} model")
    if task not in SOURCES:
        raise SystemExit(f"no held-out stream for task {task!r}")
    src = SOURCES[task](ck, args)
    tpc = sorted(float(t) for t in args.tokens_per_code.split(","))
    per_item = src.per_item
    n_items = -(-int(max(tpc) * k) // per_item)
    marks = sorted({min(n_items * per_item, int(round(t * k))) for t in tpc})

    if args.kmeans_only and args.kmeans_iters <= 0:
        raise SystemExit("--kmeans-only needs --kmeans-iters > 0")
    key = state_key(args)
    state = load_state(args.state, key) if args.state else None
    if state is not None:
        print(f"resuming from {args.state}: {state['done']:,} of {marks[-1]:,} held-out "
              f"tokens searched, {state['cpu_seconds']:.0f} CPU-s spent", flush=True)
    cpu_before = state["cpu_seconds"] if state else 0.0
    wall_before = state["seconds"] if state else 0.0
    codebooks = {}
    if not args.kmeans_only:
        with torch.no_grad():
            codebooks["SimVQ" if ck["kind"] == "simvq" else ck["kind"]] = \
                model.quantiser.codebook.detach().float().contiguous()
    km_hist = None
    if state is not None and state["kmeans"] is not None:
        codebooks["k-means"] = state["kmeans"]["centres"]
        km_hist, km_cpu = state["kmeans"]["history"], state["kmeans"]["cpu_seconds"]
    elif args.kmeans_iters > 0:
        n_train = -(-int(args.kmeans_tokens_per_code * k) // per_item)
        seed = src.meta["stream_seed"]
        gen = torch.Generator().manual_seed(seed + 1)
        xs = torch.cat([latents(model, src.train_batch(gen, min(args.chunk, n_train - i)))
                        for i in range(0, n_train, args.chunk)])
        print(f"k-means: K = {k} on {xs.shape[0]:,} training latents "
              f"({xs.shape[0] / k:g} per code), {args.kmeans_iters} iterations", flush=True)
        ck0 = time.process_time()
        centres, km_hist = kmeans(xs, k, args.kmeans_iters, seed, args.backend)
        km_cpu = time.process_time() - ck0
        codebooks["k-means"] = centres
        del xs

    payload_base = {
        "codebook_size": k, "checkpoint": os.path.abspath(args.checkpoint),
        "checkpoint_steps": ck.get("steps_done"), "checkpoint_config": ck.get("config"),
        "checkpoint_heldout_utilisation_10_per_code": ck.get("heldout_utilisation"),
        "task": task, **src.meta, "argv": sys.argv[1:],
        "environment": train.environment(), "kmeans_history": km_hist}
    if km_hist is not None:
        payload_base.update({"kmeans_iters": args.kmeans_iters, "kmeans_cpu_seconds": km_cpu,
                             "kmeans_tokens_per_code": args.kmeans_tokens_per_code})
    desc = (f"Model: {ck['kind']} at K = {k} after {ck.get('steps_done')} training steps "
            f"(config in curve.json). Held-out stream ({task}): {src.describe}; point n "
            f"uses the first n tokens. Search: simvq_kernels.nearest_code "
            f"(backend {args.backend!r}), {args.threads} thread(s).")
    if km_hist is not None:
        desc += (f" k-means: Lloyd, {args.kmeans_iters} iterations on "
                 f"{args.kmeans_tokens_per_code:g} training latents per code from the "
                 f"same encoder ({km_cpu / 60:.1f} CPU-min), initialised from random "
                 f"latents.")
    idx = {name: torch.empty(marks[-1], dtype=torch.int32) for name in codebooks}
    resumed = state["done"] if state else 0
    if resumed:
        for name in idx:
            idx[name][:resumed] = state["idx"][name]
    del state
    done, next_mark = 0, 0
    while next_mark < len(marks) and resumed >= marks[next_mark]:
        next_mark += 1  # written by the sitting that reached it
    print(f"held-out stream: {n_items:,} items = {marks[-1]:,} tokens, points at "
          f"{', '.join(f'{m:,}' for m in marks)} tokens", flush=True)

    def cpu_now():
        return cpu_before + time.process_time() - c0

    def wall_now():
        return wall_before + time.perf_counter() - t0

    def keep(done):
        save_state(args.state, {
            "key": key, "done": done, "idx": {n: v[:done].clone() for n, v in idx.items()},
            "kmeans": None if km_hist is None else {
                "centres": codebooks["k-means"], "history": km_hist, "cpu_seconds": km_cpu},
            "cpu_seconds": cpu_now(), "seconds": wall_now()})

    def report(m):
        """Write the curves of the first m tokens (every point up to m) and print them."""
        curves = {name: curve.utilisation_curve(v[:m], k, [x for x in marks if x <= m])
                  for name, v in idx.items()}
        payload = {**payload_base, "curves": curves,
                   "description": desc + (f" Expected fractions use the histogram of "
                                          f"the largest set reached ({m / k:g} tokens "
                                          f"per code)."),
                   "seconds": wall_now(), "cpu_seconds": cpu_now()}
        write(args.out, payload)
        try:
            plot(args.out, payload)
        except ImportError as e:
            print(f"no figure: {e}")
        for name, cv in curves.items():
            pt = cv["points"][-1]
            print(f"  {name}: {pt['tokens_per_code']:g} tokens/code: "
                  f"{train.format_percent(pt['utilisation'])} used "
                  f"({pt['used']:,}), expected {train.format_percent(pt['expected_seen'])}"
                  f", perplexity {pt['perplexity']:,.0f}, Chao1 "
                  f"{train.format_percent(cv['full']['chao1_utilisation'])}  "
                  f"[{cpu_now():.0f} CPU-s]", flush=True)
        return payload

    payload = None
    if next_mark:  # the points an earlier sitting reached, written again to --out
        payload = report(marks[next_mark - 1])
    if args.state and resumed == 0:
        keep(0)  # the k-means fit is kept before the long search starts
    last_save = time.perf_counter()
    for items in (src.heldout_batches(n_items, args.chunk) if resumed < marks[-1] else ()):
        if done < resumed:  # searched in an earlier sitting: the stream only moves on
            done += min(items.shape[0] * per_item, marks[-1] - done)
            continue
        z = latents(model, items)[: marks[-1] - done]
        for name, cb in codebooks.items():
            i, _ = sk.nearest_code(z, cb, backend=args.backend)
            idx[name][done:done + z.shape[0]] = i.to(torch.int32)
        done += z.shape[0]
        at_mark = next_mark < len(marks) and done >= marks[next_mark]
        stop = ((args.stop_after_tokens is not None and done >= args.stop_after_tokens)
                or (args.stop_after_minutes is not None
                    and time.perf_counter() - t0 >= 60 * args.stop_after_minutes))
        if args.state and (at_mark or stop or done == marks[-1]
                           or time.perf_counter() - last_save >= 60 * args.state_every):
            keep(done)
            last_save = time.perf_counter()
        while next_mark < len(marks) and done >= marks[next_mark]:
            payload = report(marks[next_mark])
            next_mark += 1
        if stop and done < marks[-1]:
            print(f"stopped with {done:,} of {marks[-1]:,} held-out tokens searched "
                  f"({cpu_now():.0f} CPU-s so far); state in {args.state}: run the same "
                  f"command again to go on", flush=True)
            return None
    return payload


if __name__ == "__main__":
    main()
