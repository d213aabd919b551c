"""Sample images pixel by pixel from a trained model: unconditional, class-conditional, or inpainting.

examples:
  # 64 digits as an 8x8 grid (also writes grid.npz with the raw uint8 arrays and labels)
  python tools/sample.py --model runs/joint/bundle --modality pixels --num 64 --output grid.png

  # class-conditional: ten of each digit 0..9, one row per class
  python tools/sample.py --model runs/joint/bundle --num 100 --label 0 1 2 3 4 5 6 7 8 9 --output digits.png

  # inpainting: keep the top half of an image, fill in the rest (8 completions)
  python tools/sample.py --model runs/joint/bundle --input seven.png --keep top --num 8 --output inpaint.png

  # other samplers: confidence-ordered unmasking with a linear time grid
  python tools/sample.py --model runs/joint/bundle --num 16 --method topk --grid linear --steps 32 --output topk.png

--label values are the class names of the training data (cycled over the
samples; with no --label the class is sampled too). --keep takes top, bottom,
left or right (half the image; top:0.25 a quarter) or a pixel box
Y0:Y1,X0:X1. --guidance W > 0 uses classifier-free guidance on the label
(useful only for a model trained with label dropout). --top-p defaults to 0.9:
each pixel is drawn from the intensities that make up 90% of its predicted
mass, which removes the speckle of rare values (--top-p 1 draws from the
model's distribution exactly). The same --seed gives
the same images. Exit status: 0 done, 2 a problem with the input (one line on
stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path

from maskdiff import cli
from maskdiff.progress import progress_enabled

SAMPLE_TOP_P = 0.9  # nucleus of each pixel draw; rare intensities drawn one pixel at a time read as speckle


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    p.add_argument("--modality", default="pixels", choices=("pixels",), help="what to sample (default pixels; see tools/protein.py and tools/text.py for sequences)")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--output", required=True, metavar="GRID.png", help="the image grid; the raw arrays go next to it as GRID.npz")
    p.add_argument("--label", nargs="+", metavar="CLASS", help="class label(s) to condition on, cycled over the samples")
    p.add_argument("--input", metavar="IMAGE", help="an image to inpaint (resized to the model's image size)")
    p.add_argument("--keep", metavar="REGION", help="with --input: the region to keep (default top)")
    p.add_argument("--nrow", type=int, help="images per grid row (default: a square grid, or one row per label)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight on the label (default 0 = off)")
    cli.add_sampling(p, steps=64, top_p=SAMPLE_TOP_P)
    cli.add_output(p)
    return p


def run(args) -> int:
    import numpy as np

    from maskdiff.tasks.generation import fill
    from maskdiff.tasks.images import image_records, keep_mask, load_image, save_arrays, save_grid

    if args.num < 1:
        raise cli.UserError(f"--num {args.num}: must be >= 1")
    if args.keep and not args.input:
        raise cli.UserError("--keep needs --input IMAGE")
    out = Path(args.output)
    arrays = out.with_suffix(".npz")
    cli.check_outputs([out, arrays], args.overwrite)
    bundle = cli.open_bundle(args.model, "pixels", args.device)
    adapter = bundle.adapters["pixels"]
    cli.check_count(args.num, int(np.prod(adapter.shape)) + 1)
    image = keep = None
    if args.input:
        image = load_image(adapter, args.input)
        keep = keep_mask(args.keep or "top", *adapter.shape[:2])
    labels = list(args.label or [])
    if labels and args.num % len(labels) == 0 and args.num > len(labels):
        labels = [v for v in labels for _ in range(args.num // len(labels))]  # one block (grid row) per class
    records = image_records(adapter, args.num, labels, image, keep)
    supports = [bundle.spec.support_id("pixels/label")] if args.guidance > 0 and args.label else []
    opts = cli.sampler_options(args, supports)
    cli.check_fill_memory(bundle, records, args.batch_size, args.device)
    filled = fill(bundle, records, opts, cli.generator(args.seed, args.device), batch_size=args.batch_size, device=args.device,
                  progress=progress_enabled(args.progress))
    decoded = [adapter.decode(r) for r in filled.records]
    images = np.stack([d["image"] for d in decoded])
    nrow = args.nrow or (args.num // len(args.label) if args.label and args.num % len(args.label) == 0 and args.num > len(args.label) else None)
    save_grid(images, out, nrow)
    save_arrays(arrays, images, [d["label"] for d in decoded])
    print(f"wrote {out} and {arrays}: {args.num} image(s) of {'x'.join(map(str, adapter.shape))}, {filled.network_calls} network evaluations")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
